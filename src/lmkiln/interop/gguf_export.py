"""Export a model as one GGUF file that llama.cpp runs (and so Ollama, LM Studio and the rest).

Written with `gguf`, ggml's own Python writer. Llama-style models become llama.cpp's `llama`
architecture, GPT-2-style models its `gpt2` architecture:

    lmkiln                        llama                                       gpt2
    tok_embed                     token_embd                                  token_embd
    pos_embed                     -                                           position_embd
    blocks.i.norm1                blk.i.attn_norm                             blk.i.attn_norm (+ bias)
    blocks.i.attn.wqkv  (rows)    blk.i.attn_{q,k,v}  (q, k rows permuted)    blk.i.attn_qkv (+ bias)
    blocks.i.attn.wo              blk.i.attn_output                           blk.i.attn_output (+ bias)
    blocks.i.norm2                blk.i.ffn_norm                              blk.i.ffn_norm (+ bias)
    blocks.i.mlp.w_gate_up (rows) blk.i.ffn_{gate,up}                         -
    blocks.i.mlp.w_up             -                                           blk.i.ffn_up (+ bias)
    blocks.i.mlp.w_down           blk.i.ffn_down                              blk.i.ffn_down (+ bias)
    norm_f                        output_norm                                 output_norm (+ bias)
    lm_head                       output (absent when tied)                   output (absent when tied)
    llama3 RoPE scaling           rope_freqs (per-frequency divisors)         -

llama.cpp's gpt2 graph requires every bias: a model without them gets zeros, which add nothing.
A byte-level BPE tokenizer goes in as llama.cpp's `gpt2` tokenizer with the pre-tokenizer whose
regex is the one tokenizer.json splits with (`gpt-2` for lmkiln's own), merges, token types,
BOS/EOS/PAD/end-of-turn ids and the chat template; lmkiln's character tokenizer as llama.cpp's
SentencePiece-style `llama` tokenizer, which then splits text the same way. What llama.cpp
cannot reproduce exactly is refused with one line saying why, never exported approximately.

The file is written under a temporary name in the target directory, fsynced and renamed, so a
failed write (a full disk) leaves nothing under the final name.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from lmkiln.config import ModelConfig
from lmkiln.data.tokenizer import IM_END, Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.files import atomic_path
from lmkiln.model.transformer import Transformer, count_parameters, rope_inv_freq

log = logging.getLogger("lmkiln")

DTYPES = ("f32", "f16", "q8_0")
"""f32 keeps every weight; f16 halves the matrices; q8_0 stores them as 8-bit blocks of 32 values."""


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise LmkilnError("GGUF export needs the gguf package: pip install 'lmkiln[gguf]'") from None
    return gguf


@dataclass
class GGUFReport:
    path: Path
    architecture: str
    """llama.cpp architecture: llama or gpt2."""
    dtype: str
    tensors: int
    parameters: int
    bytes: int
    seconds: float
    tokenizer: str
    """tokenizer.ggml.model and .pre: gpt2/gpt-2 (lmkiln's BPE), gpt2/llama-bpe, llama (characters) ..."""
    chat_template: bool
    notes: list[str] = field(default_factory=list)
    source: str = ""
    step: int | None = None


# --------------------------------------------------------------------------------------------
# Architecture


def gguf_architecture(cfg: ModelConfig) -> str:
    """llama or gpt2: the llama.cpp architecture that computes exactly what `cfg` computes."""
    kind = (cfg.norm, cfg.position, cfg.mlp)
    if kind == ("rms", "rope", "swiglu"):
        if 0 < cfg.sliding_window < cfg.block_size:
            raise LmkilnError(
                f"model.sliding_window={cfg.sliding_window} cannot be exported to GGUF: llama.cpp's llama "
                f"architecture attends to the whole context ({cfg.block_size} tokens), so outputs would differ"
            )
        return "llama"
    if kind == ("layer", "learned", "gelu"):
        if cfg.head_dim * cfg.n_head != cfg.d_model:
            raise LmkilnError(
                f"model.head_size={cfg.head_size} cannot be exported to GGUF: llama.cpp's gpt2 architecture "
                f"needs heads × head size = d_model ({cfg.n_head} × {cfg.head_dim} ≠ {cfg.d_model})"
            )
        if 0 < cfg.sliding_window < cfg.block_size:
            raise LmkilnError(
                f"model.sliding_window={cfg.sliding_window} cannot be exported to GGUF: llama.cpp's gpt2 "
                f"architecture has no sliding-window attention"
            )
        return "gpt2"
    raise LmkilnError(
        f"a model with norm={cfg.norm}, position={cfg.position}, mlp={cfg.mlp} has no llama.cpp "
        f"architecture: GGUF export supports rms/rope/swiglu (llama) and layer/learned/gelu (gpt2)"
    )


def rope_interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from rotate-half pairs (i, i + D/2) to adjacent pairs (2i, 2i+1).

    lmkiln (like Hugging Face) rotates channel i together with channel i + D/2; llama.cpp's llama
    architecture rotates neighbours. Permuting the rows of q and k the same way leaves every q·k
    unchanged. weight: (heads*D, C) or a bias (heads*D,).
    """
    rows = weight.shape[0]
    split = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])  # (H, 2, D/2, ...)
    return split.transpose(1, 2).reshape(weight.shape)


def gguf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """lmkiln state dict → llama.cpp's tensors (names and layouts), fp32, in file order."""
    gguf = require_gguf()
    names, T = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR
    out = {names[T.TOKEN_EMBD] + ".weight": state["tok_embed.weight"]}
    if arch == "gpt2":
        out[names[T.POS_EMBD] + ".weight"] = state["pos_embed.weight"]
    per_layer = _llama_layer if arch == "llama" else _gpt2_layer
    for i in range(cfg.n_layer):
        layer = {k[len(f"blocks.{i}.") :]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        for kind, suffix, tensor in per_layer(cfg, layer):
            out[f"{names[kind].format(bid=i)}.{suffix}"] = tensor
    out[names[T.OUTPUT_NORM] + ".weight"] = state["norm_f.weight"]
    if arch == "gpt2":
        out[names[T.OUTPUT_NORM] + ".bias"] = _bias(state, "norm_f")
    if not cfg.tie_embeddings:
        out[names[T.OUTPUT] + ".weight"] = state["lm_head.weight"]
    if arch == "llama" and cfg.rope_scaling == "llama3":
        plain = replace(cfg, rope_scaling="none")
        # llama.cpp divides each rotation frequency by its factor: factor = plain / scaled.
        out[names[T.ROPE_FREQS] + ".weight"] = rope_inv_freq(plain) / rope_inv_freq(cfg)
    return {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in out.items()}


def _bias(state: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """A module's bias, or zeros where the model has none (adding zeros changes nothing)."""
    if f"{module}.bias" in state:
        return state[f"{module}.bias"]
    return torch.zeros(state[f"{module}.weight"].shape[0])


def _llama_layer(cfg: ModelConfig, layer: dict[str, torch.Tensor]):
    gguf = require_gguf()
    T = gguf.MODEL_TENSOR
    H, K, D, F = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.ffn_dim
    yield T.ATTN_NORM, "weight", layer["norm1.weight"]
    for suffix in ("weight", "bias"):
        fused = layer.get(f"attn.wqkv.{suffix}")
        if fused is None:
            continue
        q, k, v = fused.split([H * D, K * D, K * D], dim=0)
        yield T.ATTN_Q, suffix, rope_interleave(q, H)
        yield T.ATTN_K, suffix, rope_interleave(k, K)
        yield T.ATTN_V, suffix, v
    yield from _present(layer, T.ATTN_OUT, "attn.wo")
    yield T.FFN_NORM, "weight", layer["norm2.weight"]
    for suffix in ("weight", "bias"):
        fused = layer.get(f"mlp.w_gate_up.{suffix}")
        if fused is not None:
            gate, up = fused.split([F, F], dim=0)
            yield T.FFN_GATE, suffix, gate
            yield T.FFN_UP, suffix, up
    yield from _present(layer, T.FFN_DOWN, "mlp.w_down")


def _present(layer: dict[str, torch.Tensor], kind, module: str):
    for suffix in ("weight", "bias"):
        if f"{module}.{suffix}" in layer:
            yield kind, suffix, layer[f"{module}.{suffix}"]


def _gpt2_layer(cfg: ModelConfig, layer: dict[str, torch.Tensor]):
    gguf = require_gguf()
    T = gguf.MODEL_TENSOR
    for kind, module in (
        (T.ATTN_NORM, "norm1"),
        (T.ATTN_QKV, "attn.wqkv"),
        (T.ATTN_OUT, "attn.wo"),
        (T.FFN_NORM, "norm2"),
        (T.FFN_UP, "mlp.w_up"),
        (T.FFN_DOWN, "mlp.w_down"),
    ):
        yield kind, "weight", layer[f"{module}.weight"]
        yield kind, "bias", _bias(layer, module)


def encode_tensor(name: str, tensor: torch.Tensor, dtype: str):
    """(data, GGML type) of one tensor under `dtype`, by llama.cpp's convention.

    Vectors (norms, biases, RoPE factors) and position embeddings stay f32 in every file type;
    a matrix whose rows are not a multiple of q8_0's 32-value blocks falls back to f16.
    """
    gguf = require_gguf()
    Q = gguf.GGMLQuantizationType
    array = tensor.numpy()
    keep_f32 = array.ndim == 1 or name.endswith("_norm.weight") or name.startswith("position_embd")
    if dtype == "f32" or keep_f32 or not name.endswith(".weight"):
        return array.astype(np.float32), Q.F32
    if dtype == "q8_0":
        try:
            return gguf.quants.quantize(array, Q.Q8_0), Q.Q8_0
        except gguf.QuantError:
            log.info("%s: rows of %d values are not q8_0 blocks of 32; stored as f16", name, array.shape[-1])
    return array.astype(np.float16), Q.F16


# --------------------------------------------------------------------------------------------
# Tokenizer

GPT2_SPLIT = "byte-level"  # ByteLevel(use_regex=True): GPT-2's regex, built into the pre-tokenizer
PRE_TOKENIZERS: dict[str, str] = {
    GPT2_SPLIT: "gpt-2",
    # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    # Qwen2
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
"""Regex a tokenizer.json splits text with → the llama.cpp pre-tokenizer that splits it the same way."""
IGNORES_MERGES = {"llama-bpe"}
"""Pre-tokenizers for which llama.cpp takes a whole word found in the vocabulary without merging."""


@dataclass
class GGUFVocab:
    model: str
    """tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece-style, for characters)."""
    pre: str | None
    tokens: list[str]
    types: list[int]
    merges: list[str]
    notes: list[str] = field(default_factory=list)


def _split_regex(pre_tokenizer: dict | None) -> str | None:
    """The regex a byte-level pre-tokenizer splits with (GPT2_SPLIT for ByteLevel's own), or None."""
    if not pre_tokenizer:
        return None
    if pre_tokenizer.get("type") == "ByteLevel":
        plain = pre_tokenizer.get("use_regex", True) and not pre_tokenizer.get("add_prefix_space", False)
        return GPT2_SPLIT if plain else None
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else []
    if len(steps) != 2 or [s.get("type") for s in steps] != ["Split", "ByteLevel"]:
        return None
    split, byte_level = steps
    if split.get("behavior") != "Isolated" or split.get("invert") or byte_level.get("use_regex", True):
        return None
    if byte_level.get("add_prefix_space", False):
        return None
    return split.get("pattern", {}).get("Regex")


def _tokens_by_id(spec: dict, vocab_size: int) -> tuple[dict[int, str], dict[int, bool]]:
    """id → token text, and id → special? for the added tokens."""
    by_id: dict[int, str] = {i: t for t, i in spec["model"].get("vocab", {}).items()}
    special: dict[int, bool] = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        special[added["id"]] = added.get("special", False)
    if max(by_id, default=-1) >= vocab_size:
        raise LmkilnError(
            f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embedding rows"
        )
    return by_id, special


def _token_types(by_id: dict[int, str], special: dict[int, bool], vocab_size: int, byte_tokens: bool):
    gguf = require_gguf()
    TT = gguf.TokenType
    types = []
    for i in range(vocab_size):  # rows beyond the tokenizer (padded embeddings) become unused tokens
        text = by_id.get(i)
        if text is None:
            types.append(TT.UNUSED)
        elif i in special:
            types.append(TT.CONTROL if special[i] else TT.USER_DEFINED)
        elif byte_tokens and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(TT.BYTE)
        else:
            types.append(TT.NORMAL)
    return [int(t) for t in types]


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocab:
    """llama.cpp's view of the tokenizer, or a one-line refusal where it would give other ids."""
    spec = json.loads(tokenizer.json)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise LmkilnError(
            f"the run has a {model.get('type')} tokenizer; GGUF export supports byte-level BPE and "
            f"lmkiln's character tokenizers (llama.cpp would split text differently)"
        )
    if model.get("byte_fallback"):
        return _char_vocab(spec, vocab_size)
    return _byte_level_vocab(spec, vocab_size)


def _byte_level_vocab(spec: dict, vocab_size: int) -> GGUFVocab:
    model = spec["model"]
    regex = _split_regex(spec.get("pre_tokenizer"))
    if regex not in PRE_TOKENIZERS:
        raise LmkilnError(
            f"tokenizer.json pre_tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]} matches no llama.cpp "
            f"pre-tokenizer lmkiln knows (GPT-2 byte-level, Llama 3, Qwen2); llama.cpp would split text differently"
        )
    pre = PRE_TOKENIZERS[regex]
    if bool(model.get("ignore_merges")) != (pre in IGNORES_MERGES):
        raise LmkilnError(
            f"tokenizer.json sets ignore_merges={model.get('ignore_merges')} but llama.cpp's {pre} "
            f"pre-tokenizer does the opposite; ids would differ"
        )
    notes = []
    normalizer = spec.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise LmkilnError(
            f"tokenizer.json normalizer {normalizer.get('type')} has no llama.cpp equivalent; ids would differ"
        )
    if normalizer:
        notes.append(
            "llama.cpp does not NFC-normalise input: text not already in NFC may tokenize differently"
        )
    by_id, special = _tokens_by_id(spec, vocab_size)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocab("gpt2", pre, tokens, _token_types(by_id, special, vocab_size, False), merges, notes)


SPACE_MARK = "\u2581"  # ▁: how SentencePiece vocabularies (and llama.cpp's llama tokenizer) write a space


def _char_vocab(spec: dict, vocab_size: int) -> GGUFVocab:
    """lmkiln's character tokenizer as llama.cpp's SentencePiece-style (llama) tokenizer.

    With no multi-character pieces nothing merges, so llama.cpp looks every character up and
    spells an unknown one as <0xXX> byte tokens — what the character tokenizer does — once the
    space token is written as ▁ (llama.cpp writes spaces so before looking them up).
    """
    model = spec["model"]
    plain = not model.get("merges") and not spec.get("pre_tokenizer") and not spec.get("normalizer")
    by_id, special = _tokens_by_id(spec, vocab_size)
    normal = [t for i, t in by_id.items() if i not in special and not t.startswith("<0x")]
    if not plain or any(len(t) != 1 for t in normal) or SPACE_MARK in normal:
        raise LmkilnError(
            "the run's byte-fallback tokenizer is not a plain character vocabulary (merges, a "
            "pre-tokenizer, multi-character pieces or a literal ▁); llama.cpp would split text differently"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    tokens = [SPACE_MARK if t == " " and i not in special else t for i, t in enumerate(tokens)]
    note = "llama.cpp reads a literal ▁ (U+2581) in the input as a space (lmkiln: as its bytes)"
    return GGUFVocab("llama", None, tokens, _token_types(by_id, special, vocab_size, True), [], [note])


def end_of_turn_id(tokenizer: Tokenizer) -> int | None:
    """<|im_end|> when the chat template closes turns with it (ChatML): generation stops there."""
    im_end = tokenizer.token_id(IM_END)
    if tokenizer.chat_template and im_end is not None and IM_END in tokenizer.chat_template:
        return im_end
    return None


# --------------------------------------------------------------------------------------------
# Writing


def _add_hparams(writer, cfg: ModelConfig, arch: str) -> None:
    gguf = require_gguf()
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    if cfg.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_factor)


def _add_vocab(writer, tokenizer: Tokenizer, vocab: GGUFVocab) -> int | None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.model == "gpt2":
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_merges(vocab.merges)
    else:  # no piece merges with another, so every score is the same
        writer.add_token_scores([0.0] * len(vocab.tokens))
        writer.add_add_space_prefix(False)
    writer.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.pad_id is not None:
        writer.add_pad_token_id(tokenizer.pad_id)
    # lmkiln never adds BOS/EOS when it encodes text; llama.cpp must not either, or ids differ.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        writer.add_eot_token_id(eot)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return eot


def _file_type(dtype: str) -> int:
    gguf = require_gguf()
    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]


def check_output_path(path: Path, force: bool) -> None:
    if path.is_dir():
        raise LmkilnError(f"{path} is a directory; give the path of the .gguf file to write")
    if path.exists() and not force:
        raise LmkilnError(f"{path} exists; pass --force to replace it, or choose another file name")
    if not path.parent.is_dir():
        raise LmkilnError(f"directory {path.parent} does not exist; create it first")


def write_atomically(path: Path, writer) -> None:
    """Write the GGUF through `lmkiln.files.atomic_path` (temporary name, fsync, rename)."""
    try:
        with atomic_path(path) as tmp:
            try:
                writer.write_header_to_file(path=tmp)
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()  # flushes: a full disk may only show here
    except OSError as err:
        free = shutil.disk_usage(path.parent).free / 1e6  # numpy reports a short write without errno
        raise LmkilnError(
            f"could not write {path}: {err.strerror or err} ({free:.1f} MB free there); "
            f"nothing was left under that name"
        ) from None


def export_gguf(
    model: Transformer,
    tokenizer: Tokenizer,
    out_path: str | Path,
    *,
    dtype: str = "f32",
    force: bool = False,
    name: str = "lmkiln",
) -> GGUFReport:
    """Write `model` and `tokenizer` as one GGUF file; see the module docstring."""
    start = time.perf_counter()
    gguf = require_gguf()
    if dtype not in DTYPES:
        raise LmkilnError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out_path = Path(out_path)
    cfg = model.cfg
    arch = gguf_architecture(cfg)
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)
    check_output_path(out_path, force)
    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name)
    writer.add_file_type(_file_type(dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(writer, cfg, arch)
    _add_vocab(writer, tokenizer, vocab)
    tensors = gguf_tensors(cfg, model.state_dict(), arch)
    for tensor_name, tensor in tensors.items():
        data, ggml_type = encode_tensor(tensor_name, tensor, dtype)
        writer.add_tensor(tensor_name, data, raw_dtype=ggml_type)
    write_atomically(out_path, writer)
    report = GGUFReport(
        out_path,
        arch,
        dtype,
        len(tensors),
        count_parameters(model),
        out_path.stat().st_size,
        time.perf_counter() - start,
        f"{vocab.model}/{vocab.pre}" if vocab.pre else vocab.model,
        bool(tokenizer.chat_template),
        vocab.notes,
    )
    log.debug("wrote %s (%s, %s, %d tensors)", out_path, arch, dtype, len(tensors))
    return report


def export_gguf_from(
    source: str | Path, out_path: str | Path, *, dtype: str = "f32", force: bool = False
) -> GGUFReport:
    """Export an lmkiln run (LoRA merged), one of its checkpoints, or a local Hugging Face model."""
    from lmkiln.interop.hf_import import load_pretrained

    if dtype not in DTYPES:  # before the (slow) load
        raise LmkilnError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_output_path(Path(out_path), force)
    start = time.perf_counter()
    loaded = load_pretrained(source)
    name = Path(source).resolve().name
    report = export_gguf(loaded.model, loaded.tokenizer, out_path, dtype=dtype, force=force, name=name)
    report.seconds = time.perf_counter() - start
    kind = "lmkiln run" if loaded.architecture == "lmkiln" else f"Hugging Face {loaded.architecture}"
    report.source = f"{source} ({kind})"
    return report
