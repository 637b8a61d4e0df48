"""The decoder-only transformer: Llama-style or GPT-2-style, chosen by config fields.

    tokens ─ tok_embed (+ pos_embed) ─ [ norm1 ─ attention ─ + ─ norm2 ─ mlp ─ + ] × n_layer ─ norm_f ─ lm_head

- Llama: RMSNorm, rotary positions, SwiGLU, grouped-query attention, no biases.
- GPT-2: LayerNorm, learned positions, GELU, biases.
Attention goes through `F.scaled_dot_product_attention`; Linear layers are plain `nn.Linear` (training
and loading swap them for oneDNN GEMMs on CPUs where those are faster: `kernels.swap_linears`). Four things can restrict attention beyond
causality: `doc_ids` (packed documents never see each other), `attention_mask` (padding), a
`KVCache` (generation: new queries attend to cached keys) and `cfg.sliding_window` (Mistral). Shapes are noted as (B, T, ...) with
B batch, T tokens, H heads, K key/value heads, D head size, C model width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmkiln.config import ModelConfig
from lmkiln.model.loss import lm_cross_entropy


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 (as Llama does) and cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotation speed of each channel pair (D/2,), stretched by the config's RoPE scaling.

    linear divides every frequency by rope_factor; llama3 (Llama 3.1) divides only the slow ones
    (wavelength above rope_original_context / rope_low_freq_factor), keeps the fast ones
    (below rope_original_context / rope_high_freq_factor) and blends those in between.
    """
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling != "llama3":
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    context, factor = cfg.rope_original_context, cfg.rope_factor
    slow = wavelength > context / cfg.rope_low_freq_factor
    fast = wavelength < context / cfg.rope_high_freq_factor
    scaled = torch.where(slow, inv_freq / factor, inv_freq)
    blend = (context / wavelength - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    blended = (1 - blend) * scaled / factor + blend * scaled
    return torch.where(~slow & ~fast, blended, scaled)


def rope_tables(
    head_dim: int, length: int, base: float, inv_freq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim), in the rotate-half layout Hugging Face uses."""
    if inv_freq is None:
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (length, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by position; cos/sin are (B, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class KVCache:
    """Keys and values of every layer for generation: (B, K, max_len, D) each, filled up to `length`."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(
        cls, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        return cls(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(
            cfg.d_model, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias or cfg.qkv_bias
        )
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.wqkv(x)
        dropout = self.dropout if self.training else 0.0
        q, k, v = qkv.split(
            [self.n_head * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        is_causal = mask is None and cache is None
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start : start + T] = k
            cache.values[layer][:, :, start : start + T] = v
            k = cache.keys[layer][:, :, : start + T]  # (B, K, L+T, D)
            v = cache.values[layer][:, :, : start + T]
        if self.n_kv != self.n_head:  # grouped-query attention: each K/V head serves H/K query heads
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.wo(y)


class FeedForward(nn.Module):
    """The feed-forward block of a transformer layer: SwiGLU (Llama) or GELU (GPT-2)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.ffn_dim
        if self.swiglu:
            self.w_gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=cfg.bias)  # gate and up, fused
        else:
            self.w_up = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.w_down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.w_gate_up(x).chunk(2, dim=-1)
            return self.w_down(F.silu(gate) * up)
        return self.w_down(F.gelu(self.w_up(x), approximate="tanh"))


def make_dropout(p: float) -> nn.Module:
    """Dropout, or nothing at all when p is 0 (one call less per use when generating token by token)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.norm2, self.mlp = make_norm(cfg), FeedForward(cfg)
        self.drop = make_dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache, layer))
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """Decoder-only language model; `forward` returns logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (the tokenizer's size) before building")
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.position == "learned" else None
        self.drop = make_dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight
        if cfg.position == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_base, rope_inv_freq(cfg))
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # Recompute each block's activations in backward instead of storing them (less memory,
        # ~1/3 more compute); training sets it from train.activation_checkpointing.
        self.checkpoint_activations = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("attn.wo", "mlp.w_down")) else self.cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, T, C); heads and the LM loss start from here."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > (cache.capacity if cache is not None else self.cfg.block_size):
            raise ValueError(
                f"sequence of {start + T} tokens exceeds the model's context of "
                f"{self.cfg.block_size} (or the cache's capacity)"
            )
        x = self.tok_embed(input_ids)  # (B, T, C)
        rope = None
        if self.pos_embed is not None and position_ids is None:
            x = x + self.pos_embed.weight[start : start + T]  # positions start..start+T-1, every row
        elif self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        else:
            if position_ids is None:
                position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
            rope = (
                self.rope_cos[position_ids].unsqueeze(1).to(x.dtype),  # (B, 1, T, D)
                self.rope_sin[position_ids].unsqueeze(1).to(x.dtype),
            )
        x = self.drop(x)
        mask = build_mask(
            T, start, doc_ids, attention_mask, cache is not None, x.device, self.cfg.sliding_window
        )
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            if recompute:  # keep only each block's input; backward recomputes the rest
                x = checkpoint(block, x, rope, mask, cache, layer, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, layer)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        targets: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        **kwargs,
    ) -> torch.Tensor:
        """Logits (B, T, V); given `targets` (B, T), the summed cross-entropy of the logits instead.

        With targets the logits are never all held at once (`lm_cross_entropy` chunks large
        vocabularies), which is why the loss is computed here and not by the caller.
        """
        hidden = self.hidden_states(input_ids, **kwargs)  # (B, T, C)
        if targets is None:
            return self.lm_head(hidden)
        return lm_cross_entropy(
            self.lm_head, hidden.flatten(0, 1), targets.flatten(), self.cfg.vocab_size, label_smoothing
        )


def build_mask(
    T: int,
    start: int,
    doc_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cached: bool,
    device: torch.device,
    window: int = 0,
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, start+T) mask, True where a query may attend; None for plain causal.

    Queries are the columns start..start+T-1 of the key sequence. `attention_mask` (B, start+T)
    marks real keys (1) and padding (0); `doc_ids` (B, T) restricts attention to the same document;
    a `window` > 0 lets query i see only keys i-window+1..i (sliding-window attention).
    The diagonal is always allowed so that padding rows never become all -inf (NaN).
    """
    windowed = 0 < window < start + T
    if doc_ids is None and attention_mask is None and not windowed and (not cached or T == 1):
        return None  # plain causal (is_causal), or a decode step that sees every cached key
    q = torch.arange(start, start + T, device=device)
    k = torch.arange(start + T, device=device)
    allowed = (k[None, :] <= q[:, None])[None, None]  # (1, 1, T, S)
    if windowed:
        allowed = allowed & (k[None, :] > q[:, None] - window)[None, None]
    if doc_ids is not None:
        same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
        if start:
            raise ValueError("doc_ids are not supported together with a KV cache")
        allowed = allowed & same[:, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    return allowed | (k[None, :] == q[:, None])[None, None]


# --------------------------------------------------------------------------------------------
# Size and cost


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix multiply per token (all Linear layers incl. lm_head)."""
    attn = (
        cfg.d_model * (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim + cfg.n_head * cfg.head_dim * cfg.d_model
    )
    mlp = cfg.d_model * cfg.ffn_dim * (3 if cfg.mlp == "swiglu" else 2)
    return cfg.n_layer * (attn + mlp) + cfg.d_model * cfg.vocab_size


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward+backward FLOPs per token: 6 per matmul weight plus attention (PaLM appendix B)."""
    return 6 * matmul_parameters(cfg) + 12 * cfg.n_layer * cfg.d_model * seq_len
