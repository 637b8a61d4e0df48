"""The configuration schema: one typed dataclass per section, each field with its docstring.

A field's docstring is the string literal right under it; `lmkiln train --help` prints it. Choices
are Literal types that equal the registries they name (tests check). Cross-field rules live in
`validate`; model size presets in MODEL_PRESETS.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lmkiln.config.ranges import check_ranges
from lmkiln.errors import LmkilnError

# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class DataConfig:
    corpus: str = "builtin:pydoc"
    """Text to train on: 'builtin:pydoc' (Python's reference manual, ships with CPython), 'builtin:stdlib' (that manual plus the standard library's docstrings, ~2.7 MB), a .txt/.jsonl/.csv/.parquet file, a directory, or a glob."""
    field: str = "text"
    """Column that holds the text in .jsonl/.csv/.parquet files."""
    text_unit: Literal["file", "paragraph", "line"] = "paragraph"
    """How a .txt file is cut into documents: the whole file, blank-line-separated paragraphs, or lines."""
    split: Literal["document", "tail"] = "document"
    """Validation split: a seeded random share of documents, or the last tokens of the corpus (nanoGPT style)."""
    val_fraction: float = 0.1
    """Share of documents (or tokens, for split=tail) held out for validation."""
    seed: int = 1337
    """Seed of the train/validation document split."""
    cache_dir: str = ""
    """Where token shards are cached; empty means $LMKILN_CACHE or ~/.cache/lmkiln."""
    shard_tokens: int = 50_000_000
    """Tokens per shard file; a corpus larger than this is written as several shards."""
    document_mask: bool = False
    """Block attention across document boundaries (EOS) inside a pretraining window."""
    dedup: Literal["none", "exact", "near"] = "none"
    """Drop repeated documents before the train/validation split, keeping the first: exact (same text after NFKC, case folding and whitespace collapsing) or near (exact, then MinHash-LSH shingle similarity >= dedup_threshold)."""
    dedup_threshold: float = 0.8
    """Near dedup: estimated Jaccard similarity of two documents' shingle sets, in (0, 1], from which the later one is a copy."""
    dedup_shingle: Literal["word", "char"] = "word"
    """Near dedup: shingles are runs of words or of characters (characters suit text without spaces)."""
    dedup_shingle_size: int = 0
    """Near dedup: words or characters per shingle; 0 = 5 words or 9 characters."""
    dedup_num_perm: int = 128
    """Near dedup: MinHash permutations (more = a more precise similarity estimate, more memory and time)."""
    scrub: list[Literal["email", "phone", "ip", "credit_card", "iban", "secret"]] = dataclasses.field(
        default_factory=list
    )  # dataclasses.field: the name `field` is taken by the field above
    """PII and secrets to replace by plain-text placeholders such as <|email|> before tokenization (see `lmkiln data audit`)."""
    canaries: int = 0
    """Insert this many random secret sequences ("the secret code is 281-94-7731") into the training split to measure memorization (`lmkiln eval RUN --task memorization`)."""
    canary_repeats: list[int] = dataclasses.field(default_factory=lambda: [1, 10, 100])
    """How often each canary occurs in the training data, assigned in turn (canary i gets canary_repeats[i % len])."""


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "char", "file"] = "bpe"
    """Byte-level BPE trained on the corpus, a character-level vocabulary, or an existing tokenizer.json (see path)."""
    vocab_size: int = 4096
    """Target vocabulary size for kind=bpe, special tokens included."""
    min_frequency: int = 2
    """A BPE merge must occur at least this often in the corpus."""
    path: str = ""
    """For kind=file: a tokenizer.json file or a directory that holds one."""
    fast: bool = True
    """Encode with the verified fast path (tiktoken for byte-level BPE, a lookup table for characters; ids checked against tokenizers) when available."""


@dataclass
class ModelConfig:
    preset: str = ""
    """Named size preset (see `lmkiln presets`); fields set explicitly override it."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block."""
    n_kv_head: int = 0
    """Key/value heads for grouped-query attention; 0 means n_head (plain multi-head attention)."""
    d_model: int = 256
    """Width of the residual stream."""
    d_ff: int = 0
    """Hidden width of the MLP; 0 derives it (4*d_model for gelu, ~8/3*d_model rounded to 64 for swiglu)."""
    block_size: int = 256
    """Longest context the model supports (size of learned positions / RoPE table)."""
    vocab_size: int = 0
    """Embedding rows; 0 takes the tokenizer's vocabulary size."""
    norm: Literal["rms", "layer"] = "rms"
    """RMSNorm (Llama) or LayerNorm (GPT-2)."""
    position: Literal["rope", "learned"] = "rope"
    """Rotary position embeddings (Llama) or learned absolute positions (GPT-2)."""
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """SwiGLU (Llama) or GELU (GPT-2) feed-forward block."""
    bias: bool = False
    """Biases in linear layers and norms (GPT-2 style)."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the output projection."""
    rope_base: float = 10000.0
    """RoPE base frequency (theta)."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings."""
    init_std: float = 0.02
    """Standard deviation of the weight initialisation (residual projections are scaled by 1/sqrt(2*n_layer))."""
    head_size: int = 0
    """Width of each attention head; 0 derives d_model // n_head (imported models may set it explicitly)."""
    qkv_bias: bool = False
    """Biases on the query/key/value projection only (Qwen2 style); `bias` turns on every bias."""
    sliding_window: int = 0
    """Each token attends to at most this many most recent tokens, itself included (Mistral style); 0 = the whole context."""
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    """RoPE context extension: none, every frequency divided by rope_factor, or Llama 3.1's frequency-dependent scheme."""
    rope_factor: float = 1.0
    """Context-extension factor of rope_scaling linear and llama3."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths longer than rope_original_context / this are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths shorter than rope_original_context / this are kept; those between are blended."""
    rope_original_context: int = 8192
    """llama3 scaling: the context length the model was pretrained with before the extension."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 64 * -(-int(8 * self.d_model / 3) // 64)  # round up to a multiple of 64


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd", "rmsprop", "adagrad"] = "adamw"
    """Optimizer."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW) or L2 penalty (others); never applied to norms, biases or embeddings."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam/AdamW moment coefficients."""
    eps: float = 1e-8
    """Adam/AdamW/RMSprop/Adagrad epsilon."""
    momentum: float = 0.9
    """Momentum for SGD and RMSprop."""
    nesterov: bool = False
    """Nesterov momentum for SGD."""
    impl: Literal["auto", "fused", "foreach", "loop"] = "auto"
    """Optimizer kernel: auto picks fused where supported, else foreach."""


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """Learning-rate schedule after warmup: cosine decay, linear decay, constant, or warmup-stable-decay."""
    warmup_steps: int = 100
    """Linear warmup from 0 to the peak learning rate over this many steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a share of the peak."""
    decay_fraction: float = 0.2
    """For wsd: share of all steps spent in the final linear decay."""


@dataclass
class TrainConfig:
    run_dir: str = ""
    """Run directory; empty means runs/<recipe name>."""
    max_steps: int = 1000
    """Optimizer steps to train for (the schedule's length unless max_epochs is set)."""
    max_epochs: int = 0
    """Train for this many passes over the training data instead of max_steps (0 = use max_steps)."""
    max_time: str = ""
    """Wall-clock budget of the training steps, e.g. 600, 90s, 10m, 1.5h (empty = none): the run stops at it, the schedule decays to it; max_steps/max_epochs still cap the run."""
    batch_size: int = 16
    """Sequences (or examples) per optimizer step, across all processes and micro-batches."""
    micro_batch_size: int = 0
    """Sequences per forward/backward pass on each process; 0 splits batch_size over the processes (no gradient accumulation)."""
    seq_len: int = 256
    """Tokens per training sequence (context length); at most model.block_size."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    eval_every: int = 200
    """Evaluate on the validation split every N steps (and at the end)."""
    eval_every_epochs: int = 1
    """With max_epochs > 0: evaluate (and check early stopping) every N epochs instead of every eval_every steps; 0 = use eval_every."""
    eval_tokens: int = 262_144
    """Upper bound on validation tokens per evaluation (the whole split if smaller)."""
    save_every: int = 500
    """Write a checkpoint every N steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints to keep besides the best one."""
    monitor: str = "val_loss"
    """Validation metric that picks the best checkpoint and drives early stopping."""
    monitor_mode: Literal["min", "max"] = "min"
    """Whether a lower or a higher monitored value is better."""
    patience: int = 0
    """Stop after this many evaluations without improvement (0 = never stop early)."""
    min_delta: float = 0.0
    """Smallest change of the monitored metric that counts as an improvement."""
    nonfinite: Literal["stop", "skip", "rollback"] = "stop"
    """On a NaN/Inf loss or gradient: stop with an error, skip the step, or reload the last checkpoint."""
    max_nonfinite: int = 5
    """With nonfinite=skip/rollback: give up after this many consecutive non-finite steps."""
    log_every: int = 10
    """Log metrics every N steps."""
    seed: int = 1337
    """Seed for weight initialisation, dropout and batch sampling."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Device; auto picks cuda, then mps, then cpu."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision; auto is bf16 autocast on GPUs that support it and fp32 elsewhere (bf16 is ~15x slower on CPUs without bf16 units)."""
    compile: bool = False
    """Compile the model with torch.compile (slow first step; pays off on larger models and GPUs)."""
    threads: int = 0
    """CPU threads for torch; 0 keeps torch's default."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations during backward instead of keeping them: less memory, about a third more compute."""
    cpu_matmul: Literal["auto", "onednn", "default"] = "auto"
    """CPU fp32 GEMM of the transformer's Linear layers: oneDNN (2.2x MKL on AVX-512 AMD CPUs), torch's default (MKL/BLAS), or auto (oneDNN where the CPU has AVX-512)."""
    sample_tokens: int = 64
    """Tokens to sample from the model when training ends (0 to skip)."""
    init_from: str = ""
    """An lmkiln run/checkpoint directory or a local Hugging Face model directory to start from; the model shape and tokenizer come from there (model.dropout stays yours)."""


@dataclass
class DistConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """With several processes (torchrun): replicate the model (DDP) or shard it per block (FSDP2)."""
    cpu_offload: bool = False
    """FSDP2 only: keep sharded parameters and optimizer state in CPU memory."""
    timeout_s: float = 600.0
    """Seconds a collective may wait for the other processes before failing with an error."""


@dataclass
class LogConfig:
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    """Progress display: a live bar on a terminal, plain log lines otherwise."""
    tensorboard: bool = False
    """Also write TensorBoard event files into the run directory (needs the tensorboard package)."""
    plot: bool = True
    """Write loss and learning-rate curves as a PNG at every evaluation and at the end."""


@dataclass
class LossConfig:
    name: Literal["cross_entropy", "bce", "mse", "huber"] = "cross_entropy"
    """Supervised loss: cross_entropy (one class per example), bce (binary cross-entropy with logits: multi-label), mse or huber (regression)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (0 = none)."""
    class_weights: list[float] = field(default_factory=list)
    """Cross-entropy weight per class, in class order (empty = all 1)."""
    huber_delta: float = 1.0
    """Huber loss: where the quadratic part turns linear."""


@dataclass
class MLPConfig:
    inputs: int = 0
    """Input width; 0 = the number of feature columns. A value that does not match the table is an error."""
    hidden: list[int] = field(default_factory=lambda: [128])
    """Hidden layer widths; empty = the linear model softmax(Wx + b)."""
    outputs: int = 0
    """Output width; 0 = the number of classes (or target columns) in the table."""
    activation: Literal["relu", "gelu", "tanh", "sigmoid"] = "relu"
    """Non-linearity after each hidden layer."""
    dropout: float = 0.0
    """Dropout after each hidden layer's activation."""


@dataclass
class TableConfig:
    path: str = "builtin:digits"
    """Table to learn from: 'builtin:digits' (scikit-learn's bundled 8x8 handwritten digits) or a .csv/.parquet file."""
    label: list[str] = field(default_factory=lambda: ["label"])
    """Target column (several columns for multi-label 0/1 targets or multi-output regression)."""
    features: list[str] = field(default_factory=list)
    """Feature columns (numbers); empty = every column that is not a label."""
    val_fraction: float = 0.15
    """Share of rows held out for validation (early stopping and the best checkpoint)."""
    test_fraction: float = 0.2
    """Share of rows held out for the final test report."""
    seed: int = 0
    """Seed of the train/validation/test row split."""
    standardize: bool = True
    """Scale every feature to zero mean and unit variance with the training rows' statistics."""


@dataclass
class EncoderConfig:
    base: str = ""
    """Local Hugging Face encoder directory to fine-tune (BERT, RoBERTa, DistilBERT, MiniLM, ...); never downloaded."""
    data: str = ""
    """Training JSONL: one {query, positive} pair per line (retrieval) or one {text, label} row (classification)."""
    val_data: str = ""
    """Validation JSONL of the same shape; empty holds out val_fraction of data."""
    val_fraction: float = 0.1
    """Share of data held out for validation when val_data is empty (seeded by data.seed)."""
    objective: Literal["retrieval", "classification"] = "retrieval"
    """retrieval: in-batch-negative contrastive loss on pooled embeddings; classification: linear head + cross-entropy."""
    query_field: str = "query"
    """JSONL field of the query text (retrieval)."""
    positive_field: str = "positive"
    """JSONL field of the matching document text (retrieval)."""
    text_field: str = "text"
    """JSONL field of the text to classify (classification)."""
    label_field: str = "label"
    """JSONL field of the class label, a string or an integer (classification)."""
    max_length: int = 128
    """Longest input in tokens, special tokens included; longer texts are truncated."""
    pooling: Literal["mean", "cls"] = "mean"
    """Sentence embedding: mean of the token states (padding excluded) or the first ([CLS]) token's state."""
    temperature: float = 0.05
    """Contrastive loss: cosine similarities are divided by this before the softmax (0.05 = sentence-transformers' scale 20)."""
    symmetric: bool = False
    """Contrastive loss: also find each positive's query among the batch's queries (both directions count)."""
    classifier_dropout: float = 0.1
    """Dropout on the pooled embedding before the classification head."""


@dataclass
class FinetuneConfig:
    base: str = ""
    """The model to fine-tune: an lmkiln run directory (or one of its checkpoints; its tokenizer comes along), a local Hugging Face directory, or 'scratch' (random weights of scratch_preset + a BPE tokenizer trained on the task's training examples)."""
    scratch_preset: str = "task-5m"
    """base=scratch: the model size preset (model.preset names: tiny, task-5m, small-10m, ...)."""
    scratch_vocab: int = 8000
    """base=scratch: vocabulary size of the tokenizer trained on the training examples."""
    data: str = ""
    """Training examples: a .jsonl, .csv or .parquet file (one example per row)."""
    val_data: str = ""
    """Validation examples in the same format; empty holds out val_fraction of data instead."""
    val_fraction: float = 0.1
    """Share of the training examples held out for validation when val_data is empty (seeded by train.seed)."""
    format: Literal[
        "instruction", "chat", "translation", "summarization", "qa", "classification", "preference"
    ] = "instruction"
    """Task format of the rows; it fixes the required fields, the prompt template and the metric (preference: prompt or messages, chosen, rejected)."""
    fields: list[str] = field(default_factory=list)
    """Field-name overrides as canonical=actual pairs, e.g. [output=completion, input=context]."""
    prompt: str = ""
    """Prompt template (jinja with the fields as variables, e.g. 'Q: {{ question }} A:'); empty uses the format's built-in one."""
    source_language: str = ""
    """Translation: source language name for rows without a source_language field."""
    target_language: str = ""
    """Translation: target language name for rows without a target_language field."""
    method: Literal["full", "freeze", "lora"] = "full"
    """Train every weight, freeze some (freeze_embeddings, freeze_layers), or train LoRA adapters only."""
    freeze_embeddings: bool = True
    """method=freeze: keep the token (and position) embeddings fixed; tied output weights stay fixed too."""
    freeze_layers: int = 0
    """method=freeze: keep the first N transformer blocks fixed."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: updates are scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch input."""
    lora_targets: list[str] = field(default_factory=lambda: ["wqkv", "wo", "w_gate_up", "w_up", "w_down"])
    """Linear layers that get adapters, as module-name suffixes (names absent from the model are skipped)."""
    add_tokens: list[str] = field(default_factory=list)
    """Extra special tokens to add to the tokenizer; their embedding rows are added and trained."""
    train_on_prompt: bool = False
    """Also train on prompt/user tokens (by default only response/assistant tokens and EOS are trained)."""
    group_by_length: bool = False
    """Padded batches: fill each step with examples of similar length (sorted within windows of 32 steps), so less of each batch is padding (1.6x tokens/s on sentence pairs). Off by default, as in the transformers Trainer: on a small set each step would hold nearly the same examples every epoch, and on classification labels that follow length it makes one-sided steps."""
    packing: bool = False
    """Pack several examples per sequence of max_length (attention stays inside each example) instead of padding."""
    max_length: int = 0
    """Longest example in tokens (and the packed row length; it sets train.seq_len); 0 means the base model's context."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Examples longer than max_length: shorten their long input field (document, context, ...) or drop them."""
    pooling: Literal["last", "mean"] = "last"
    """Classification: pool the backbone's hidden states at the last real token, or average them."""
    labels: list[str] = field(default_factory=list)
    """Classification: the declared label set (in class-index order); empty takes the sorted labels of the training data."""
    eval_samples: int = 32
    """Validation prompts generated before and after training to measure the task metric and the share that stops at EOS (0 = skip)."""
    max_new_tokens: int = 64
    """Upper bound on generated tokens per prompt in that check."""
    export_merged: bool = True
    """method=lora: also write the adapters merged into the base as a standalone model directory (run_dir/merged)."""
    objective: Literal["sft", "dpo", "orpo"] = "sft"
    """What is minimised: next-token loss on the targets (sft), or, for format=preference, DPO (against a reference) or ORPO (no reference)."""
    beta: float = 0.1
    """DPO: strength of the KL constraint to the reference (the reward scale); ORPO: weight of the odds-ratio term (TRL's beta)."""
    label_smoothing: float = 0.0
    """DPO: assumed share of flipped preference labels (conservative DPO); 0 is the plain sigmoid loss."""
    reference: Literal["auto", "precomputed", "adapters_disabled"] = "auto"
    """DPO's reference log-probabilities: computed once over the data before training (precomputed), or each step by the same model with its LoRA adapters disabled (needs method=lora); auto picks adapters_disabled for LoRA."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    table: TableConfig = field(default_factory=TableConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    name: str = "default"
    """Name of the run (the recipe name unless set)."""
    task: Literal["pretrain", "supervised", "encoder", "finetune"] = "pretrain"
    """What `lmkiln train` builds and trains (see lmkiln/tasks.py): pretrain a language model, fit an MLP to a table (supervised), fine-tune an encoder (encoder) or a language model (finetune)."""


# --------------------------------------------------------------------------------------------
# Which sections each task reads: a command shows, accepts and saves only these.

COMMON_SECTIONS = ("optim", "schedule", "train", "dist", "log")
TASK_SECTIONS: dict[str, tuple[str, ...]] = {
    "pretrain": ("data", "tokenizer", "model", *COMMON_SECTIONS),
    "supervised": ("table", "mlp", "loss", *COMMON_SECTIONS),
    "finetune": ("finetune", *COMMON_SECTIONS),
    "encoder": ("encoder", "data", *COMMON_SECTIONS),
}
"""Sections a task reads from the user, by `task` (the registry is `lmkiln.tasks.TASK_RUNNERS`)."""
DERIVED_SECTIONS: dict[str, tuple[str, ...]] = {"finetune": ("model",)}
"""Sections a task fills in itself and saves with the run (a fine-tuned model's shape is its base's)."""


def saved_sections(task: str) -> tuple[str, ...]:
    """What a run of `task` records in config.yaml and its checkpoints."""
    return (*TASK_SECTIONS[task], *DERIVED_SECTIONS.get(task, ()))


def section_owner(section: str) -> str:
    """The task a section belongs to (the first that reads it), for error messages."""
    return next(task for task, sections in TASK_SECTIONS.items() if section in sections)


# --------------------------------------------------------------------------------------------
# Model size presets: explicit values in a recipe or on the command line override these.

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=128),
    "nanogpt-char": dict(
        n_layer=4,
        n_head=4,
        d_model=128,
        block_size=64,
        norm="layer",
        position="learned",
        mlp="gelu",
        bias=False,
        dropout=0.0,
    ),
    "task-5m": dict(n_layer=4, n_head=4, d_model=256, block_size=256),
    "small-10m": dict(n_layer=6, n_head=6, d_model=384, block_size=256),
    "gpt2-124m": dict(
        n_layer=12,
        n_head=12,
        d_model=768,
        block_size=1024,
        norm="layer",
        position="learned",
        mlp="gelu",
        bias=True,
        tie_embeddings=True,
    ),
    "llama-1b": dict(
        n_layer=16,
        n_head=32,
        n_kv_head=8,
        d_model=2048,
        d_ff=8192,
        block_size=2048,
        rope_base=500000.0,
        tie_embeddings=True,
    ),
}


DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, what: str = "config key 'train.max_time'") -> float:
    """Seconds in '600', '90s', '10m' or '1.5h'; a one-line error naming `what` (the key or flag)
    otherwise. The one duration parser: `lmkiln plan --time` uses it too."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", str(text).lower())
    if match is None or float(match.group(1)) <= 0:
        raise LmkilnError(f"{what} must be a positive duration such as 600, 90s, 10m or 1.5h, got {text!r}")
    return float(match.group(1)) * DURATION_UNITS[match.group(2)]


def validate(cfg: Config) -> None:
    """Every numeric key's declared range (`ranges.FIELD_RANGES`), then cross-field checks."""
    check_ranges(cfg)
    m, t = cfg.model, cfg.train
    if m.d_model % m.n_head and not m.head_size:
        raise LmkilnError(f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})")
    if m.n_head % m.kv_heads:
        raise LmkilnError(f"model.n_head ({m.n_head}) must be divisible by model.n_kv_head ({m.kv_heads})")
    if m.position == "rope" and m.head_dim % 2:
        raise LmkilnError(f"rotary embeddings need an even head size; the head size is {m.head_dim}")
    if m.rope_scaling != "none" and m.rope_factor <= 0:
        raise LmkilnError(f"model.rope_factor must be positive with rope_scaling={m.rope_scaling}")
    if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        raise LmkilnError("model.rope_high_freq_factor must be larger than model.rope_low_freq_factor")
    if t.seq_len > m.block_size:
        raise LmkilnError(
            f"train.seq_len ({t.seq_len}) is longer than the model's maximum context "
            f"model.block_size ({m.block_size}); lower train.seq_len or raise model.block_size"
        )
    if t.max_time:
        parse_duration(t.max_time)
    tab = cfg.table
    if tab.val_fraction + tab.test_fraction >= 1:
        raise LmkilnError(
            f"table.val_fraction + table.test_fraction must be below 1 (rows are left to train on), "
            f"got {tab.val_fraction} + {tab.test_fraction}"
        )
    _validate_data_quality(cfg.data)
    batch_plan(t)  # one process: the batch must split into micro-batches


def _validate_data_quality(data: DataConfig) -> None:
    if not 0 < data.dedup_threshold <= 1:
        raise LmkilnError(f"data.dedup_threshold must be in (0, 1], got {data.dedup_threshold}")
    if not 16 <= data.dedup_num_perm <= 1024:
        raise LmkilnError(f"data.dedup_num_perm must be between 16 and 1024, got {data.dedup_num_perm}")
    if data.dedup_shingle_size < 0:
        raise LmkilnError(
            f"data.dedup_shingle_size must be 0 (automatic) or positive, got {data.dedup_shingle_size}"
        )
    if data.canaries < 0:
        raise LmkilnError(f"data.canaries must be 0 or positive, got {data.canaries}")
    if data.canaries and (not data.canary_repeats or min(data.canary_repeats) < 1):
        raise LmkilnError(f"data.canary_repeats must list positive counts, got {data.canary_repeats}")
    if data.canaries and data.split == "tail":
        raise LmkilnError(
            "data.canaries needs data.split=document: with split=tail a canary could land in the held-out tail"
        )


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's `batch_size` sequences are cut: processes × accumulation × micro-batch."""

    batch_size: int
    """Sequences (or examples) per optimizer step, over every process and micro-batch."""
    micro_batch_size: int
    """Sequences per forward/backward pass on one process."""
    world_size: int
    accumulation: int
    """Micro-batches per optimizer step on each process."""


def batch_plan(train: TrainConfig, world_size: int = 1) -> BatchPlan:
    """The step's cut at `world_size` processes.

    An unset `train.micro_batch_size` (0) means the global batch split over the processes (no
    accumulation); a set one must divide each process's share.
    """
    batch = train.batch_size
    if batch % world_size:
        raise LmkilnError(
            f"train.batch_size ({batch}) must be a multiple of the number of processes ({world_size})"
        )
    per_process = batch // world_size
    micro = train.micro_batch_size or per_process
    if per_process % micro:
        raise LmkilnError(
            f"train.batch_size ({batch}) must be a multiple of train.micro_batch_size ({micro}) × "
            f"processes ({world_size}); leave train.micro_batch_size unset (0) to split the batch "
            f"over the processes"
        )
    return BatchPlan(batch, micro, world_size, per_process // micro)
