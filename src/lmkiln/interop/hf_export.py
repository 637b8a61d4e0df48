"""Export a trained lmkiln run as a Hugging Face model directory that transformers loads as is.

    OUT_DIR/
      config.json                       LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or GPT2LMHeadModel
      model.safetensors                 (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
      generation_config.json            bos/eos/pad ids; generation stops at <|endoftext|> and <|im_end|>
      tokenizer.json, tokenizer_config.json (with the chat template)

Writing needs only safetensors and JSON; transformers is used by `verify_export` alone. A LoRA run
exports merged because `load_run` returns the merged model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmkiln.data.templates import render_chat
from lmkiln.data.tokenizer import IM_END, Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.files import make_output_dir
from lmkiln.interop.hf_format import ARCHITECTURES, export_model_type, hf_config, to_hf_tensors
from lmkiln.model.transformer import Transformer, count_parameters
from lmkiln.runs.load import load_run
from lmkiln.runs.tensors import save_tensors

log = logging.getLogger("lmkiln")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEFAULT_SHARD_BYTES = 5 * 1024**3
SAFE_INDEX = "model.safetensors.index.json"


@dataclass
class ExportReport:
    out_dir: Path
    architecture: str
    files: list[str]
    parameters: int
    bytes: int
    seconds: float
    checkpoint: Path | None = None
    step: int | None = None


@dataclass
class VerifyReport:
    max_abs_logits_diff: float
    """Largest |lmkiln logit − transformers logit| over the probe texts (fp32)."""
    tokens_equal: bool
    """AutoTokenizer gives lmkiln's ids for plain text (add_special_tokens=False: an imported
    tokenizer may add BOS by default) and for the rendered chat template."""
    template_equal: bool
    """apply_chat_template renders the same string as lmkiln's template."""
    mismatches: list[str] = field(default_factory=list)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2kB' or a plain number of bytes → bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?b?)\s*", text.lower())
    scale = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}
    try:
        value = float(match.group(1)) * scale[match.group(2)] if match else -1.0
    except ValueError:
        value = -1.0
    if value <= 0:
        raise LmkilnError(
            f"cannot read the size {text!r}; write e.g. 5GB, 500MB or a positive number of bytes"
        )
    return int(value)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise LmkilnError(f"{out_dir} is a file, not a directory; choose a directory to export into")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise LmkilnError(
                f"{out_dir} exists and is not empty; pass --overwrite or choose another directory"
            )
        shutil.rmtree(out_dir)
    make_output_dir(out_dir)  # removed again if the export fails (a full disk, ...)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or numbered shards of at most max_shard_bytes plus the standard index."""
    total = sum(_nbytes(t) for t in tensors.values())
    metadata = {"format": "pt"}
    if total <= max_shard_bytes:
        save_tensors(out_dir / "model.safetensors", tensors, metadata)
        return ["model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():  # greedy, in order; a tensor larger than the limit stands alone
        if shards[-1] and size + _nbytes(tensor) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += _nbytes(tensor)
    files, weight_map = [], {}
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(out_dir / file, shard, metadata)
        files.append(file)
        weight_map.update(dict.fromkeys(shard, file))
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / SAFE_INDEX).write_text(json.dumps(index_json, indent=2), encoding="utf-8")
    return [*files, SAFE_INDEX]


def _token_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    return {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}


def generation_config(tokenizer: Tokenizer) -> dict:
    eos = [tokenizer.eos_id]
    im_end = tokenizer.token_id(IM_END)
    if im_end is not None and tokenizer.chat_template and im_end not in eos:
        eos.append(im_end)  # a chat turn ends at <|im_end|>
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": tokenizer.pad_id,
    }


def export_model(
    model: Transformer,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> ExportReport:
    """Write `model` and `tokenizer` as a Hugging Face directory; see the module docstring."""
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise LmkilnError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    cfg = model.cfg
    model_type = export_model_type(cfg)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    ours = {k: v.detach().to("cpu", DTYPES[dtype]) for k, v in model.state_dict().items()}
    tensors = to_hf_tensors(cfg, ours, model_type)
    files = write_safetensors(tensors, out_dir, max_shard_bytes)
    config = hf_config(cfg, model_type, _token_ids(tokenizer), dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out_dir / "generation_config.json").write_text(
        json.dumps(generation_config(tokenizer), indent=2), encoding="utf-8"
    )
    tokenizer.save(out_dir)
    files += ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    size = sum(os.path.getsize(out_dir / f) for f in files)
    report = ExportReport(
        out_dir, ARCHITECTURES[model_type], files, count_parameters(model), size, time.perf_counter() - start
    )
    log.debug("exported %s (%s, %d files) to %s", report.architecture, dtype, len(files), out_dir)
    return report


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> ExportReport:
    """Export the newest checkpoint of a run (or the given checkpoint directory)."""
    start = time.perf_counter()
    loaded = load_run(run_dir)
    report = export_model(
        loaded.model,
        loaded.tokenizer,
        out_dir,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    )
    report.seconds = time.perf_counter() - start
    report.checkpoint, report.step = loaded.checkpoint, loaded.step
    return report


# --------------------------------------------------------------------------------------------
# Verification with transformers (optional dependency)

PROBE_TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n"]
PROBE_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "Hi."},
]


def require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise LmkilnError("this needs transformers: pip install 'lmkiln[hf]'") from None


def verify_export(
    model: Transformer, tokenizer: Tokenizer, out_dir: str | Path, dtype: str = "float32"
) -> VerifyReport:
    """Load `out_dir` with transformers (no custom code) and compare logits and token ids.

    Both sides compute in fp32. `model` is put in eval mode and fp32 and, for an export in a
    narrower `dtype`, its weights are rounded to that dtype in place, so the two models compared
    hold the same numbers.
    """
    require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = str(out_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, local_files_only=True
    ).eval()
    hf_tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    mismatches: list[str] = []
    worst = 0.0
    model = model.float().eval()
    if dtype != "float32":
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.copy_(tensor.to(DTYPES[dtype]))
    for text in PROBE_TEXTS:
        ours = tokenizer.encode(text)
        theirs = hf_tok(text, add_special_tokens=False)["input_ids"]  # imported tokenizers may add BOS
        if ours != theirs:
            mismatches.append(f"ids of {text!r}: lmkiln {ours[:8]}…, transformers {theirs[:8]}…")
        ids = torch.tensor([ours[: model.cfg.block_size]])
        with torch.no_grad():
            diff = (model(ids) - hf_model(ids).logits[..., : model.cfg.vocab_size]).abs().max().item()
        worst = max(worst, diff)
    template_equal = True
    if tokenizer.chat_template:
        rendered = hf_tok.apply_chat_template(PROBE_CHAT, tokenize=False, add_generation_prompt=True)
        template_equal = rendered == render_chat(tokenizer.chat_template, PROBE_CHAT, True)
        ids = hf_tok.apply_chat_template(PROBE_CHAT, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        if list(ids) != tokenizer.encode_template(rendered):
            mismatches.append("ids of the rendered chat template differ")
        if not template_equal:
            mismatches.append("the chat template renders differently")
    report = VerifyReport(worst, not mismatches, template_equal, mismatches)
    if not math.isfinite(worst):
        report.mismatches.append("non-finite logits")
    return report
