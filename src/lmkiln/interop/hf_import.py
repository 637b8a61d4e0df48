"""Import a local Hugging Face decoder checkpoint (Llama, Mistral, Qwen2, GPT-2) into lmkiln's model.

`load_hf_model(DIR)` reads config.json, model.safetensors (or its shards) and tokenizer.json and
returns lmkiln's own `Transformer` computing the same logits as transformers (fp32, within 1e-4),
ready for continued pretraining (`train.init_from`) or fine-tuning. Nothing is downloaded and no
code from the checkpoint runs: a name that is not a local directory is an error, and neither
transformers nor `trust_remote_code` is involved.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file

from lmkiln.config import ModelConfig
from lmkiln.data.tokenizer import Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.interop.hf_format import ARCHITECTURES, from_hf_tensors, model_config_from_hf
from lmkiln.model.transformer import Transformer
from lmkiln.runs.load import find_checkpoint, load_run, local_directory
from lmkiln.runs.tensors import load_model_tensors

log = logging.getLogger("lmkiln")

SAFE_INDEX = "model.safetensors.index.json"


class ImportedModel(NamedTuple):
    """A model ready for lmkiln: unpack as `model, tokenizer, config, architecture = ...`."""

    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    architecture: str
    """Where it came from: a transformers class name, or 'lmkiln' for an lmkiln run."""


def read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmkilnError(f"{file} not found; a Hugging Face model directory holds config.json") from None
    except json.JSONDecodeError as err:
        raise LmkilnError(f"{file}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(value, dict):
        raise LmkilnError(f"{file}: expected a JSON object")
    return value


def read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors or of the shards its index names."""
    index = directory / SAFE_INDEX
    if index.is_file():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickled = [p.name for p in directory.glob("*.bin")]
        hint = (
            f" ({', '.join(pickled)} are pickle files, which lmkiln never loads: convert them to "
            f"safetensors with transformers' save_pretrained)"
            if pickled
            else ""
        )
        raise LmkilnError(f"{directory} has no model.safetensors or {SAFE_INDEX}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        path = directory / file
        if not path.is_file():
            raise LmkilnError(f"{index}: names {file}, which is missing")
        tensors.update(load_file(str(path)))
    return tensors


def load_hf_tokenizer(directory: Path) -> Tokenizer:
    if not (directory / "tokenizer.json").is_file():
        raise LmkilnError(
            f"{directory} has no tokenizer.json; lmkiln needs the fast-tokenizer file (save the "
            f"tokenizer with transformers' AutoTokenizer.save_pretrained to write it)"
        )
    return Tokenizer.load(directory)


def load_hf_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_context: int | None = None,
    device: str = "cpu",
) -> ImportedModel:
    """Build lmkiln's Transformer from a local Hugging Face checkpoint directory.

    max_context caps the model's block_size (a Llama 3 config allows 131072 positions, whose RoPE
    table alone takes 134 MB); positions below the cap behave exactly as in the original.
    """
    directory = local_directory(path)
    config = read_json(directory / "config.json")
    source = str(directory / "config.json")
    cfg = model_config_from_hf(config, source, max_context)
    tokenizer = load_hf_tokenizer(directory)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LmkilnError(
            f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{cfg.vocab_size} embeddings; the directory mixes two models"
        )
    tensors = from_hf_tensors(cfg, read_hf_tensors(directory), config["model_type"], str(directory))
    if "pos_embed.weight" in tensors:  # learned positions beyond max_context are dropped
        tensors["pos_embed.weight"] = tensors["pos_embed.weight"][: cfg.block_size]
    model = Transformer(cfg)
    load_model_tensors(model, tensors, str(directory))
    model.to(device=torch.device(device), dtype=dtype).eval()
    architecture = ARCHITECTURES[config["model_type"]]
    log.info("imported %s from %s (%d layers, width %d)", architecture, directory, cfg.n_layer, cfg.d_model)
    return ImportedModel(model, tokenizer, cfg, architecture)


def is_lmkiln_run(directory: Path) -> bool:
    return (directory / "checkpoints").is_dir() or (directory / "manifest.json").is_file()


def load_pretrained(path: str | Path, device: str = "cpu") -> ImportedModel:
    """An lmkiln run (or checkpoint) directory, or a local Hugging Face model directory."""
    directory = local_directory(path)
    if is_lmkiln_run(directory):
        loaded = load_run(directory, device=device)
        return ImportedModel(loaded.model, loaded.tokenizer, loaded.cfg.model, "lmkiln")
    if (directory / "config.json").is_file():
        return load_hf_model(directory, device=device)
    raise LmkilnError(
        f"{directory} is neither an lmkiln run (no checkpoints/) nor a Hugging Face model "
        f"directory (no config.json)"
    )


def tokenizer_directory(path: str | Path) -> Path:
    """Where the tokenizer of `load_pretrained(path)` lives: run/tokenizer, or the directory itself."""
    directory = local_directory(path)
    if is_lmkiln_run(directory):
        return find_checkpoint(directory)[0] / "tokenizer"
    return directory
