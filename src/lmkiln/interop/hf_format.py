"""The Hugging Face checkpoint format of decoder models: config.json fields and tensor names.

Both directions live here so that export and import cannot drift apart. Four architectures are
understood; their config fields are translated into lmkiln's `ModelConfig` and back, and a list
of `Link`s says which Hugging Face tensors make up each lmkiln tensor:

    lmkiln                        Llama / Mistral / Qwen2               GPT-2 (Conv1D stores (in, out))
    tok_embed                     model.embed_tokens                    transformer.wte
    pos_embed                     -                                     transformer.wpe
    blocks.i.norm1                model.layers.i.input_layernorm        transformer.h.i.ln_1
    blocks.i.attn.wqkv  (rows)    self_attn.{q,k,v}_proj  (concatenated) attn.c_attn (transposed)
    blocks.i.attn.wo              self_attn.o_proj                      attn.c_proj (transposed)
    blocks.i.norm2                post_attention_layernorm              ln_2
    blocks.i.mlp.w_gate_up (rows) mlp.{gate,up}_proj  (concatenated)    -
    blocks.i.mlp.w_up             -                                     mlp.c_fc (transposed)
    blocks.i.mlp.w_down           mlp.down_proj                         mlp.c_proj (transposed)
    norm_f                        model.norm                            transformer.ln_f
    lm_head                       lm_head (absent when tied)            lm_head (absent when tied)

No transformers import is needed: configs are plain JSON and tensors plain safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmkiln.config import ModelConfig
from lmkiln.errors import LmkilnError

ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
"""model_type → the transformers class that loads it without custom code."""

SUPPORTED = ", ".join(ARCHITECTURES)
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# Buffers some checkpoints store that are not weights (recomputed by every implementation).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


# --------------------------------------------------------------------------------------------
# Tensor names


@dataclass(frozen=True)
class Link:
    """One lmkiln tensor = the Hugging Face tensors `theirs` concatenated along dim 0."""

    ours: str
    theirs: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    """Rows of each part when `theirs` has several (splitting fused q/k/v or gate/up)."""
    transpose: bool = False
    """GPT-2's Conv1D stores weight matrices as (in, out), nn.Linear as (out, in)."""


def family(model_type: str) -> str:
    return "llama" if model_type in LLAMA_FAMILY else model_type


def links(cfg: ModelConfig, model_type: str) -> list[Link]:
    """Every tensor of an lmkiln model of `cfg` and its Hugging Face counterparts."""
    if family(model_type) == "gpt2":
        return _gpt2_links(cfg)
    return _llama_links(cfg)


def _llama_links(cfg: ModelConfig) -> list[Link]:
    H, K, D, F = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.ffn_dim
    out = [Link("tok_embed.weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        attn, mlp = theirs + "self_attn.", theirs + "mlp."
        qkv = tuple(attn + p for p in ("q_proj", "k_proj", "v_proj"))
        gate_up = (mlp + "gate_proj", mlp + "up_proj")
        out += [
            Link(ours + "norm1.weight", (theirs + "input_layernorm.weight",)),
            Link(ours + "attn.wqkv.weight", tuple(n + ".weight" for n in qkv), (H * D, K * D, K * D)),
            Link(ours + "attn.wo.weight", (attn + "o_proj.weight",)),
            Link(ours + "norm2.weight", (theirs + "post_attention_layernorm.weight",)),
            Link(ours + "mlp.w_gate_up.weight", tuple(n + ".weight" for n in gate_up), (F, F)),
            Link(ours + "mlp.w_down.weight", (mlp + "down_proj.weight",)),
        ]
        if cfg.bias or cfg.qkv_bias:
            out.append(Link(ours + "attn.wqkv.bias", tuple(n + ".bias" for n in qkv), (H * D, K * D, K * D)))
        if cfg.bias:
            out += [
                Link(ours + "attn.wo.bias", (attn + "o_proj.bias",)),
                Link(ours + "mlp.w_gate_up.bias", tuple(n + ".bias" for n in gate_up), (F, F)),
                Link(ours + "mlp.w_down.bias", (mlp + "down_proj.bias",)),
            ]
    out.append(Link("norm_f.weight", ("model.norm.weight",)))
    if not cfg.tie_embeddings:
        out.append(Link("lm_head.weight", ("lm_head.weight",)))
    return out


def _gpt2_links(cfg: ModelConfig) -> list[Link]:
    out = [
        Link("tok_embed.weight", ("transformer.wte.weight",)),
        Link("pos_embed.weight", ("transformer.wpe.weight",)),
    ]
    pairs = [
        ("norm1", "ln_1", False),
        ("attn.wqkv", "attn.c_attn", True),
        ("attn.wo", "attn.c_proj", True),
        ("norm2", "ln_2", False),
        ("mlp.w_up", "mlp.c_fc", True),
        ("mlp.w_down", "mlp.c_proj", True),
    ]
    for i in range(cfg.n_layer):
        for ours, theirs, conv1d in pairs:
            for kind in ("weight", "bias"):
                out.append(
                    Link(
                        f"blocks.{i}.{ours}.{kind}",
                        (f"transformer.h.{i}.{theirs}.{kind}",),
                        transpose=conv1d and kind == "weight",
                    )
                )
    out += [
        Link("norm_f.weight", ("transformer.ln_f.weight",)),
        Link("norm_f.bias", ("transformer.ln_f.bias",)),
    ]
    if not cfg.tie_embeddings:
        out.append(Link("lm_head.weight", ("lm_head.weight",)))
    return out


def to_hf_tensors(
    cfg: ModelConfig, tensors: dict[str, torch.Tensor], model_type: str
) -> dict[str, torch.Tensor]:
    """lmkiln state dict → Hugging Face tensors; biases the format has but lmkiln lacks are zeros.

    A zero bias adds nothing, so a bias-free lmkiln model is exactly a GPT-2 with zero biases.
    """
    out: dict[str, torch.Tensor] = {}
    for link in links(cfg, model_type):
        tensor = tensors.get(link.ours)
        if tensor is None:
            if not link.ours.endswith(".bias"):
                raise KeyError(f"lmkiln model has no tensor {link.ours}")
            rows = tensors[link.ours[: -len("bias")] + "weight"].shape[0]
            tensor = torch.zeros(rows, dtype=tensors["tok_embed.weight"].dtype)
        parts = tensor.split(list(link.sizes), dim=0) if link.sizes else (tensor,)
        for name, part in zip(link.theirs, parts):
            part = part.t() if link.transpose else part
            out[name] = part.detach().contiguous()
    return out


def normalise_hf_names(tensors: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Add the prefix that base-model checkpoints (GPT2Model, LlamaModel) leave out."""
    prefix = "transformer." if family(model_type) == "gpt2" else "model."
    if any(name.startswith(prefix) for name in tensors):
        return tensors
    return {(name if name.startswith("lm_head.") else prefix + name): t for name, t in tensors.items()}


def from_hf_tensors(
    cfg: ModelConfig, tensors: dict[str, torch.Tensor], model_type: str, source: str
) -> dict[str, torch.Tensor]:
    """Hugging Face tensors → lmkiln state dict; missing or unexpected tensors are errors."""
    tensors = normalise_hf_names(tensors, model_type)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for link in links(cfg, model_type):
        missing = [name for name in link.theirs if name not in tensors]
        if missing:
            raise LmkilnError(f"{source}: tensor {missing[0]} is missing; the checkpoint is incomplete")
        parts = [tensors[name].t() if link.transpose else tensors[name] for name in link.theirs]
        out[link.ours] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        used.update(link.theirs)
    unexpected = sorted(
        name
        for name in set(tensors) - used
        if not name.endswith(IGNORED_SUFFIXES) and not (cfg.tie_embeddings and name == "lm_head.weight")
    )
    if unexpected:
        raise LmkilnError(
            f"{source}: tensors lmkiln's model has no place for: {', '.join(unexpected[:3])}"
            f"{' …' if len(unexpected) > 3 else ''}; this checkpoint uses features lmkiln does not "
            f"implement, so its outputs would differ"
        )
    return out


# --------------------------------------------------------------------------------------------
# Export: ModelConfig → config.json


def export_model_type(cfg: ModelConfig) -> str:
    """The architecture that expresses `cfg` exactly, or a clear error."""
    if (cfg.norm, cfg.position, cfg.mlp) == ("layer", "learned", "gelu"):
        if cfg.kv_heads != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.d_model:
            raise LmkilnError(
                "GPT-2 has neither grouped-query attention nor a separate head size; this model sets "
                f"n_kv_head={cfg.n_kv_head}, head_size={cfg.head_size}, so it cannot be exported"
            )
        if cfg.sliding_window:
            raise LmkilnError("GPT-2 has no sliding-window attention; this model cannot be exported")
        return "gpt2"
    if (cfg.norm, cfg.position, cfg.mlp) != ("rms", "rope", "swiglu"):
        raise LmkilnError(
            f"model with norm={cfg.norm}, position={cfg.position}, mlp={cfg.mlp} fits no Hugging Face "
            f"architecture lmkiln exports: LlamaForCausalLM needs rms/rope/swiglu, GPT2LMHeadModel "
            f"needs layer/learned/gelu"
        )
    if cfg.sliding_window:
        if cfg.bias or cfg.qkv_bias:
            raise LmkilnError("sliding-window attention with biases fits no Hugging Face architecture")
        return "mistral"
    return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling == "linear":
        params.update(rope_type="linear", factor=cfg.rope_factor)
    elif cfg.rope_scaling == "llama3":
        params.update(
            rope_type="llama3",
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_context,
        )
    return params


def hf_config(cfg: ModelConfig, model_type: str, token_ids: dict[str, int | None], dtype: str) -> dict:
    """config.json for `cfg` (readable by transformers 4.45+ and 5.x)."""
    common = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": token_ids.get("bos"),
        "eos_token_id": token_ids.get("eos"),
        "pad_token_id": token_ids.get("pad"),
        "dtype": dtype,
        "torch_dtype": dtype,  # the name transformers 4 reads
        "use_cache": True,
    }
    if model_type == "gpt2":
        return {
            **common,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_positions": cfg.block_size,
            "n_inner": cfg.ffn_dim,
            "activation_function": "gelu_new",  # tanh-approximated GELU, as lmkiln computes it
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    rope = rope_parameters(cfg)
    legacy_scaling = None if rope["rope_type"] == "default" else {**rope, "type": rope["rope_type"]}
    config = {
        **common,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_base,  # transformers 4 reads these two top-level keys
        "rope_scaling": legacy_scaling,
        "attention_dropout": cfg.dropout,
    }
    if model_type == "llama":
        config.update(attention_bias=cfg.bias, mlp_bias=cfg.bias, pretraining_tp=1)
    elif model_type == "mistral":
        config.update(sliding_window=cfg.sliding_window)
    elif model_type == "qwen2":
        config.update(
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=cfg.n_layer,
            layer_types=["full_attention"] * cfg.n_layer,
        )
    return config


# --------------------------------------------------------------------------------------------
# Import: config.json → ModelConfig


def import_model_type(config: dict, source: str) -> str:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        named = config.get("architectures") or []
        what = f"model_type {model_type!r}" + (f" ({', '.join(named)})" if named else "")
        raise LmkilnError(f"{source}: {what} is not supported; lmkiln imports {SUPPORTED}")
    return model_type


def model_config_from_hf(config: dict, source: str, max_context: int | None = None) -> ModelConfig:
    """The lmkiln ModelConfig that computes what transformers computes for this config.json."""
    model_type = import_model_type(config, source)
    cfg = _gpt2_config(config, source) if model_type == "gpt2" else _llama_config(config, model_type, source)
    if max_context:
        cfg.block_size = min(cfg.block_size, max_context)
    if cfg.n_head % cfg.kv_heads:
        raise LmkilnError(
            f"{source}: {cfg.n_head} heads are not a multiple of {cfg.kv_heads} key/value heads"
        )
    return cfg


def _require(ok: bool, source: str, what: str) -> None:
    if not ok:
        raise LmkilnError(f"{source}: {what}; lmkiln cannot reproduce this model exactly")


def _gpt2_config(c: dict, source: str) -> ModelConfig:
    activation = c.get("activation_function", "gelu_new")
    _require(activation in TANH_GELU, source, f"activation_function {activation!r} is not the tanh GELU")
    _require(c.get("scale_attn_weights", True), source, "scale_attn_weights is false")
    _require(
        not c.get("scale_attn_by_inverse_layer_idx", False), source, "scale_attn_by_inverse_layer_idx is set"
    )
    _require(not c.get("add_cross_attention", False), source, "the model has cross-attention")
    d_model = c["n_embd"]
    return ModelConfig(
        n_layer=c["n_layer"],
        n_head=c["n_head"],
        d_model=d_model,
        d_ff=c.get("n_inner") or 4 * d_model,
        block_size=c.get("n_positions", 1024),
        vocab_size=c["vocab_size"],
        norm="layer",
        position="learned",
        mlp="gelu",
        bias=True,
        tie_embeddings=c.get("tie_word_embeddings", True),
        norm_eps=c.get("layer_norm_epsilon", 1e-5),
        dropout=c.get("resid_pdrop", 0.0),
        init_std=c.get("initializer_range", 0.02),
    )


def _llama_config(c: dict, model_type: str, source: str) -> ModelConfig:
    activation = c.get("hidden_act", "silu")
    _require(activation == "silu", source, f"hidden_act {activation!r} is not silu (SwiGLU)")
    d_model, n_head = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or d_model // n_head
    attention_bias = c.get("attention_bias", False) if model_type == "llama" else False
    mlp_bias = c.get("mlp_bias", False) if model_type == "llama" else False
    _require(attention_bias == mlp_bias, source, "attention_bias and mlp_bias differ")
    cfg = ModelConfig(
        n_layer=c["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=c.get("num_key_value_heads") or n_head,
        d_model=d_model,
        d_ff=c["intermediate_size"],
        block_size=c.get("max_position_embeddings", 2048),
        vocab_size=c["vocab_size"],
        norm="rms",
        position="rope",
        mlp="swiglu",
        bias=attention_bias,
        qkv_bias=model_type == "qwen2",
        tie_embeddings=c.get("tie_word_embeddings", False),
        norm_eps=c.get("rms_norm_eps", 1e-6),
        dropout=c.get("attention_dropout", 0.0),
        init_std=c.get("initializer_range", 0.02),
        head_size=head_dim if head_dim * n_head != d_model else 0,
    )
    _read_rope(c, cfg, source)
    cfg.sliding_window = _sliding_window(c, model_type, cfg.n_layer, source)
    return cfg


def _read_rope(c: dict, cfg: ModelConfig, source: str) -> None:
    """rope_parameters (transformers 5) or rope_theta + rope_scaling (transformers 4)."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if "full_attention" in params:  # per-layer-type parameters: all layers here are full attention
        params = params["full_attention"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    _require(
        rope_type in ROPE_TYPES,
        source,
        f"RoPE type {rope_type!r} is not implemented (lmkiln implements {', '.join(ROPE_TYPES)})",
    )
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    _require(partial == 1.0, source, f"partial_rotary_factor is {partial}")
    cfg.rope_base = float(params.get("rope_theta", c.get("rope_theta") or 10000.0))
    if rope_type == "default":
        return
    cfg.rope_scaling = "linear" if rope_type == "linear" else "llama3"
    cfg.rope_factor = float(params["factor"])
    if rope_type == "llama3":
        cfg.rope_low_freq_factor = float(params["low_freq_factor"])
        cfg.rope_high_freq_factor = float(params["high_freq_factor"])
        cfg.rope_original_context = int(
            params.get("original_max_position_embeddings") or c.get("max_position_embeddings", 8192)
        )


def _sliding_window(c: dict, model_type: str, n_layer: int, source: str) -> int:
    """The window of every layer (0 = none); a mix of windowed and full layers is refused."""
    window = c.get("sliding_window") or 0
    if model_type == "llama" or not window:
        return 0
    if model_type == "mistral":
        return int(window)
    layer_types = c.get("layer_types")
    if layer_types is None:  # transformers 4 Qwen2: layers from max_window_layers on slide
        start = c.get("max_window_layers", n_layer) if c.get("use_sliding_window", False) else n_layer
        layer_types = ["full_attention"] * min(start, n_layer) + ["sliding_attention"] * (n_layer - start)
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return 0
    _require(kinds == {"sliding_attention"}, source, "some layers use a sliding window and others do not")
    return int(window)
