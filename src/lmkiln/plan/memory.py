"""Predicted peak memory of a training step, part by part, for one process and per strategy.

Weights, gradients and optimizer state follow from the parameter counts. Activations are not
guessed from a formula: `probe_activations` runs one forward pass of a one- and a two-block copy
of the model (a tiny vocabulary, one sequence) under `saved_tensors_hooks` and adds up the
tensors autograd keeps for the backward pass. The difference is one block's saved activations,
exact for this architecture, whatever it uses (SwiGLU, dropout masks, LoRA branches,
checkpointing); the logits, which a real vocabulary makes large, are added from their shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch.autograd.graph import saved_tensors_hooks

from lmkiln.config import FinetuneConfig, ModelConfig, OptimConfig
from lmkiln.model.loss import CHUNK_ABOVE, CHUNK_LOGITS
from lmkiln.model.transformer import Transformer, count_parameters
from lmkiln.plan.measure import RuntimeMemory

FP32 = 4


def optimizer_states(optim: OptimConfig) -> int:
    """fp32 tensors of state the optimizer keeps per trainable parameter: Adam's two moments,
    RMSprop's square average (and momentum buffer), Adagrad's sum, SGD's momentum buffer (none
    without momentum)."""
    momentum = 1 if optim.momentum > 0 else 0
    return {"adamw": 2, "adam": 2, "sgd": momentum, "rmsprop": 1 + momentum, "adagrad": 1}[optim.name]


PROBE_VOCAB = 64
"""Vocabulary of the probe models: the logits are added from their real shape instead."""


@dataclass(frozen=True)
class ActivationProbe:
    """Bytes autograd saves for one sequence of seq_len tokens."""

    per_block: int
    """One transformer block (what activation checkpointing would otherwise keep)."""
    per_block_checkpointed: int
    """One block when checkpointed: its input only."""
    outside_blocks: int
    """Embeddings, final norm and the head's input, without the logits themselves."""
    total_parameters: int
    trainable_parameters: int
    embedding_parameters: int
    mapped_gradients: int = 0
    """Bytes of the gradients of MMAP_THRESHOLD_MAX or more each: glibc maps them apart, so they
    never stay in its heap."""


def mapped_bytes(parameters: list[tuple[int, int]]) -> int:
    """Bytes of the (numel, copies) parameter tensors whose fp32 gradient glibc maps apart."""
    return sum(numel * FP32 * copies for numel, copies in parameters if numel * FP32 >= MMAP_THRESHOLD_MAX)


def saved_tensor_bytes(model: torch.nn.Module, forward: Callable[[], object]) -> list[int]:
    """Bytes of each distinct tensor autograd saves while `forward()` runs `model` (its parameters
    and buffers excluded)."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and storage.nbytes():
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return list(saved.values())


def _saved_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    return sum(saved_tensor_bytes(model, lambda: model(tokens, targets=tokens)))


def _probe_model(cfg: ModelConfig, n_layer: int, lora: FinetuneConfig | None) -> Transformer:
    model = Transformer(replace(cfg, n_layer=n_layer, vocab_size=PROBE_VOCAB))
    if lora is not None:
        from peft import LoraConfig, inject_adapter_in_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for t in lora.lora_targets if t in present]
        config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, target_modules=targets)
        model = inject_adapter_in_model(config, model)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
    return model.train()


def probe_activations(cfg: ModelConfig, seq_len: int, lora: FinetuneConfig | None = None) -> ActivationProbe:
    """Saved activations of this architecture at seq_len (a few ms to a few s, on the CPU)."""
    torch.manual_seed(0)
    tokens = torch.randint(0, PROBE_VOCAB, (1, seq_len))
    saved = {}
    for checkpointed in (False, True):
        for layers in (1, 2):
            model = _probe_model(cfg, layers, lora)
            model.checkpoint_activations = checkpointed
            saved[checkpointed, layers] = _saved_bytes(model, tokens)
    per_block = saved[False, 2] - saved[False, 1]
    logits = seq_len * PROBE_VOCAB * FP32  # the log-softmax output the loss keeps
    total, trainable, embedding = _parameter_counts(cfg, lora)
    return ActivationProbe(
        mapped_gradients=_mapped_gradients(cfg, lora),
        per_block=per_block,
        per_block_checkpointed=saved[True, 2] - saved[True, 1],
        outside_blocks=max(saved[False, 1] - per_block - logits, 0),
        total_parameters=total,
        trainable_parameters=trainable,
        embedding_parameters=embedding,
    )


def _mapped_gradients(cfg: ModelConfig, lora: FinetuneConfig | None) -> int:
    """mapped_bytes of the full-size model's trainable parameters: a one-block probe's, each block
    parameter counted n_layer times and the vocabulary-sized ones at the real vocabulary."""
    model = _probe_model(cfg, 1, lora)
    vocabulary = {id(model.tok_embed.weight), id(model.lm_head.weight)}
    tensors = [
        (
            p.numel() * (cfg.vocab_size // PROBE_VOCAB if id(p) in vocabulary else 1),
            cfg.n_layer if "blocks." in name else 1,
        )
        for name, p in model.named_parameters()
        if p.requires_grad
    ]
    return mapped_bytes(tensors)


def _parameter_counts(cfg: ModelConfig, lora: FinetuneConfig | None) -> tuple[int, int, int]:
    """(total, trainable, embedding) of the full-size model, computed from two small ones."""
    small = [_probe_model(cfg, n, lora) for n in (1, 2)]
    per_block = [count_parameters(m) - count_parameters(small[0]) for m in small][1]
    per_block_trainable = count_parameters(small[1], True) - count_parameters(small[0], True)
    rest = count_parameters(small[0]) - per_block
    rest_trainable = count_parameters(small[0], True) - per_block_trainable
    vocab_rows = (cfg.vocab_size - PROBE_VOCAB) * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    total = rest + vocab_rows + cfg.n_layer * per_block
    trainable = rest_trainable + cfg.n_layer * per_block_trainable
    if lora is None:
        trainable += vocab_rows
    else:  # LoRA adapters are the only trainable weights (the probe has no adapter on lm_head)
        total -= cfg.n_layer * per_block_trainable + rest_trainable
    embedding = cfg.vocab_size * cfg.d_model + (
        cfg.block_size * cfg.d_model if cfg.position == "learned" else 0
    )
    return total, trainable, embedding


MMAP_THRESHOLD_MAX = 32 * 2**20
"""glibc's largest mmap threshold: a tensor this large or larger is mapped on allocation and
unmapped on free, never kept in its heap."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes of one training process, by part.

    Weights and optimizer state live through the whole run; the rest of a step comes and goes in
    two phases that never peak together: the end of the forward pass (every saved activation and
    the logits; the gradients too when micro-batches accumulate into them) and the backward pass
    (the gradients and one block's worth of transient tensors; the checkpointed block inputs too).
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int
    """Saved for backward across all blocks (per micro-batch)."""
    activations_per_block: int
    logits: int
    """The logits, their log-softmax and gradient at the head (one chunk's when chunked)."""
    backward_transient: int
    """What backward holds beyond the gradients: one block's activation gradients (or the block a
    checkpointed backward recomputes), the widest layer's for an MLP."""
    runtime: int
    """What the training process adds beyond its tensors, measured on this machine
    (`lmkiln.plan.measure.runtime_memory`)."""
    heap_retention: int
    """Memory the C allocator keeps after a step frees it (glibc holds freed blocks under 32 MiB
    in its heap for reuse): a measured fraction of the step's heap-sized tensors."""
    kv_cache: int
    """Keys and values of block_size tokens for one sequence at generation time (not part of the peak)."""
    accumulating: bool = False
    """Several micro-batches per step: the gradients exist during every forward after the first."""
    checkpointing: bool = False
    """The checkpointed block inputs (`activations`) stay alive through backward."""

    def phases(self, gradients: int | None = None) -> dict[str, int]:
        """What the step holds beyond weights and optimizer state at the end of forward and in
        backward, with `gradients` bytes of gradients (default: this process's own)."""
        gradients = self.gradients if gradients is None else gradients
        return {
            "forward": self.activations + self.logits + (gradients if self.accumulating else 0),
            "backward": gradients + self.backward_transient + (self.activations if self.checkpointing else 0),
        }

    def step_peak(self, gradients: int | None = None) -> int:
        """The larger phase (DDP's buckets double the gradients; FSDP2 holds shards, counted with
        the weights, so 0 here)."""
        return max(self.phases(gradients).values())

    @property
    def tensors(self) -> int:
        """The most tensor memory alive at once (what torch's allocator hands out)."""
        return self.weights + self.optimizer + self.step_peak()

    @property
    def total(self) -> int:
        return self.tensors + self.runtime + self.heap_retention

    def parts(self) -> dict[str, int]:
        """The parts by name (the phases' parts are listed whole: they do not all peak at once)."""
        names = ["weights", "gradients", "optimizer", "activations", "logits", "backward_transient"]
        parts = {name: getattr(self, name) for name in names}
        parts |= {"runtime": self.runtime, "heap_retention": self.heap_retention}
        return {name: value for name, value in parts.items() if value or name in names[:3]}

    def retaining(self, share: float, mapped_gradients: int, created: int | None = None) -> MemoryEstimate:
        """This estimate with `heap_retention`: `share` of the larger phase counted in the tensors
        glibc keeps in its heap. The gradients less `mapped_gradients` (tensors of
        MMAP_THRESHOLD_MAX or more are mapped apart), the logits when each of their three tensors
        is under it, and every activation the forward pass `created`: checkpointing frees most at
        once, but the heap is shaped by what passed through it (measured: a checkpointed step
        leaves as much behind as a plain one)."""
        heap_step = replace(
            self,
            activations=self.activations if created is None else created,
            logits=self.logits if self.logits // 3 < MMAP_THRESHOLD_MAX else 0,
            gradients=self.gradients - mapped_gradients,
            checkpointing=False,
        )
        return replace(self, heap_retention=int(share * heap_step.step_peak()))


def logits_bytes(tokens: int, vocab_size: int) -> int:
    """Logit-sized tensors alive at once around the loss: logits, log-softmax and their gradient."""
    if tokens * vocab_size > CHUNK_ABOVE:  # lm_cross_entropy then works on chunks of CHUNK_LOGITS
        rows = max(1, CHUNK_LOGITS // vocab_size)
        return 3 * rows * vocab_size * FP32
    return 3 * tokens * vocab_size * FP32


def training_memory(
    cfg: ModelConfig,
    probe: ActivationProbe,
    micro_batch: int,
    seq_len: int,
    optim: OptimConfig | None = None,
    checkpointing: bool = False,
    runtime: RuntimeMemory | None = None,
    accumulation: int = 1,
) -> MemoryEstimate:
    """One process, fp32 weights (the CPU default; bf16 autocast keeps fp32 masters too)."""
    runtime = runtime or RuntimeMemory(0, 0.0)
    trainable = probe.trainable_parameters
    per_block = probe.per_block_checkpointed if checkpointing else probe.per_block
    activations = micro_batch * (cfg.n_layer * per_block + probe.outside_blocks)
    # backward holds one block's activation gradients, or the block checkpointing recomputes
    transient = micro_batch * probe.per_block
    estimate = MemoryEstimate(
        weights=probe.total_parameters * FP32,
        gradients=trainable * FP32,
        optimizer=optimizer_states(optim or OptimConfig()) * trainable * FP32,
        activations=activations,
        activations_per_block=micro_batch * per_block,
        logits=logits_bytes(micro_batch * seq_len, cfg.vocab_size),
        backward_transient=transient,
        runtime=runtime.overhead,
        heap_retention=0,
        kv_cache=2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * cfg.block_size * FP32,
        accumulating=accumulation > 1,
        checkpointing=checkpointing,
    )
    created = micro_batch * (cfg.n_layer * probe.per_block + probe.outside_blocks)
    return estimate.retaining(runtime.heap_retention, probe.mapped_gradients, created)


def per_strategy(
    estimate: MemoryEstimate, n_layer: int, world_size: int, sharded_runtime: int | None = None
) -> dict[str, int]:
    """Peak bytes per process for each way of spreading the run over `world_size` processes;
    `estimate` is one process's at its share of the batch.

    DDP replicates everything and adds gradient buckets (a second copy of the gradients); FSDP2
    shards weights, gradients and optimizer state and gathers one block's weights at a time (two
    with prefetching); CPU offload keeps FSDP's shards in host memory (`fsdp_offload_host`), so
    the device holds the activations and the gathered blocks only. `sharded_runtime` is FSDP2's
    runtime overhead where it differs (its sharded weights take torch's default CPU GEMM, whose
    kernels hold less than oneDNN's).
    """
    e = estimate
    process = e.runtime + e.heap_retention
    gathered = 2 * e.weights // max(n_layer, 1)
    sharded = math.ceil((e.weights + e.gradients + e.optimizer) / world_size)
    sharded_process = (e.runtime if sharded_runtime is None else sharded_runtime) + e.heap_retention
    step = e.step_peak(0) + gathered + sharded_process  # FSDP2: the gradients are among the shards
    return {
        "ddp": e.weights + e.optimizer + e.step_peak(2 * e.gradients) + process,
        "fsdp": sharded + step,
        "fsdp_offload_device": step,
        "fsdp_offload_host": sharded,
    }
