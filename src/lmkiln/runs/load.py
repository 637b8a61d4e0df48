"""Load a trained model for use from a run directory or one of its checkpoints (LoRA merged).

`load_run` gives a plain `Transformer` (adapters of a LoRA run folded into the weights, shards of
an FSDP run gathered) with its tokenizer and config; `load_classifier` the same for a
classification fine-tuning run (a backbone under a head). Loaded models have their Linear layers
swapped for oneDNN's GEMMs where those are faster (`lmkiln.model.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmkiln.config import Config
from lmkiln.data.tokenizer import Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.model.classifier import SequenceClassifier
from lmkiln.model.kernels import swap_linears
from lmkiln.model.lora import has_lora, lora_scaling, merge_lora_tensors
from lmkiln.model.transformer import Transformer
from lmkiln.runs import checkpoint as ckpt
from lmkiln.runs.rundir import saved_config
from lmkiln.runs.tensors import load_model_tensors


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    cfg: Config
    checkpoint: Path
    step: int


def local_directory(path: str | Path, what: str = "model") -> Path:
    """`path` as a directory, or the error every model-loading command gives for hub ids."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise LmkilnError(
            f"{what} {str(path)!r} is not a local directory; lmkiln never downloads models: download "
            f"it first (e.g. huggingface-cli download NAME --local-dir DIR) and pass the path"
        )
    return directory


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run directory, newest complete checkpoint) for a run directory or a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise LmkilnError(f"run directory not found: {path}")
    if (path / ckpt.MANIFEST).is_file():
        return path.parent.parent, path
    checkpoint = ckpt.latest_checkpoint(path / "checkpoints")
    if checkpoint is None:
        raise LmkilnError(
            f"{path} has no complete checkpoint; train first (lmkiln train --train.run_dir {path})"
        )
    return path, checkpoint


def load_run(path: str | Path, device: str = "cpu") -> LoadedModel:
    run_dir, checkpoint = find_checkpoint(path)
    tokenizer_dir = run_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise LmkilnError(f"{run_dir} has no tokenizer/tokenizer.json; it is not a complete lmkiln run")
    saved = ckpt.read_checkpoint(checkpoint)
    cfg = saved_config(saved.trainer["config"], f"{checkpoint}/trainer.json")
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = Transformer(cfg.model)
    if saved.model:
        load_model_tensors(
            model, plain_tensors(saved.model, cfg, checkpoint), str(checkpoint / "model.safetensors")
        )
    else:  # a sharded (FSDP) checkpoint without consolidated weights: gather the shards here
        from lmkiln.runs.dcp import consolidate

        consolidate(saved.sharded, model)
    swap_linears(model, "auto")  # oneDNN's GEMV streams the weights faster than MKL's on AVX-512 CPUs
    model.to(torch.device(device)).eval()
    return LoadedModel(model, tokenizer, cfg, checkpoint, saved.trainer["state"]["step"])


def plain_tensors(tensors: dict[str, torch.Tensor], cfg: Config, checkpoint: Path) -> dict[str, torch.Tensor]:
    """A plain Transformer's tensors: LoRA adapters of a fine-tuning run are merged into the weights."""
    if any(k.startswith("backbone.") for k in tensors):
        raise LmkilnError(
            f"{checkpoint} belongs to a classification run (a backbone with a classification head); "
            f"evaluate it with `lmkiln eval RUN_DIR --task classification`"
        )
    if has_lora(tensors):
        return merge_lora_tensors(tensors, lora_scaling(cfg.finetune))
    return tensors


def load_classifier(path: str | Path, device: str = "cpu") -> tuple[SequenceClassifier, Tokenizer, Config]:
    """(classifier, tokenizer, config) of a classification fine-tuning run (LoRA merged)."""
    run_dir, checkpoint = find_checkpoint(path)
    saved = ckpt.read_checkpoint(checkpoint)
    cfg = saved_config(saved.trainer["config"], f"{checkpoint}/trainer.json")
    model = SequenceClassifier(Transformer(cfg.model), len(cfg.finetune.labels), cfg.finetune.pooling)
    tensors = saved.model
    if has_lora(tensors):
        tensors = merge_lora_tensors(tensors, lora_scaling(cfg.finetune))
    load_model_tensors(model, tensors, str(checkpoint / "model.safetensors"))
    swap_linears(model, "auto")
    return model.to(torch.device(device)).eval(), Tokenizer.load(run_dir / "tokenizer"), cfg
