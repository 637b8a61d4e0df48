"""Hugging Face interop without downloads: export lmkiln models and load them with transformers,
import tiny random transformers models into lmkiln, and compare logits and token ids."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from lmkiln.config import ModelConfig
from lmkiln.data.templates import render_chat
from lmkiln.data.tokenizer import Tokenizer, train_bpe
from lmkiln.errors import LmkilnError
from lmkiln.interop.hf_export import export_model, verify_export
from lmkiln.interop.hf_import import load_hf_model, load_pretrained
from lmkiln.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

TOL = 1e-4
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [" ".join(WORDS[(i + j) % 8] for j in range(12)) + f" {i}." for i in range(300)]
    return train_bpe(iter(texts), 320)


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every weight off its initial value, so norms ≠ 1 and biases ≠ 0 take part in the check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def lmkiln_model(vocab: int, **overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, d_model=64, n_head=4, n_kv_head=2, n_layer=2, block_size=64)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    model = Transformer(cfg).eval()
    perturb(model)
    return model


GPT2_STYLE = dict(norm="layer", position="learned", mlp="gelu", bias=True, n_kv_head=0)
EXPORTS = {
    "llama-gqa-tied": ({}, "LlamaForCausalLM"),
    "llama-mha-untied": ({"n_kv_head": 0, "tie_embeddings": False}, "LlamaForCausalLM"),
    "llama-biases": ({"bias": True}, "LlamaForCausalLM"),
    "llama3-rope-scaling": (
        {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_context": 16, "rope_base": 5e5},
        "LlamaForCausalLM",
    ),
    "qwen2-qkv-bias": ({"qkv_bias": True}, "Qwen2ForCausalLM"),
    "mistral-sliding-window": ({"sliding_window": 8}, "MistralForCausalLM"),
    "gpt2-untied": ({**GPT2_STYLE, "tie_embeddings": False}, "GPT2LMHeadModel"),
    "gpt2-no-bias-tied": ({**GPT2_STYLE, "bias": False}, "GPT2LMHeadModel"),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_export_loads_in_transformers_with_equal_logits(name, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    overrides, architecture = EXPORTS[name]
    model = lmkiln_model(tokenizer.vocab_size, **overrides)
    report = export_model(model, tokenizer, tmp_path / "hf")
    assert report.architecture == architecture
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == architecture
    ids = torch.randint(0, tokenizer.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff < TOL, diff
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    if "rope_parameters" in config:  # transformers 4 readers look for the top-level key
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]


def test_sliding_window_and_rope_scaling_matter(tokenizer, tmp_path):
    """The two exports above would pass by accident if the settings did nothing: they do not."""
    ids = torch.randint(0, tokenizer.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    plain = lmkiln_model(tokenizer.vocab_size)
    for overrides in (
        {"sliding_window": 8},
        {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_context": 16},
    ):
        changed = lmkiln_model(tokenizer.vocab_size, **overrides)
        with torch.no_grad():
            assert (changed(ids) - plain(ids)).abs().max() > 1e-3, overrides


def test_export_shards_above_the_size_limit_and_transformers_reads_them(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = lmkiln_model(tokenizer.vocab_size, tie_embeddings=False)
    report = export_model(model, tokenizer, tmp_path / "hf", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(f for f in report.files if f.endswith(".safetensors"))
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = torch.arange(30)[None]
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < TOL
    again = load_hf_model(tmp_path / "hf")  # lmkiln reads its own shards back
    with torch.no_grad():
        assert torch.equal(again.model(ids), model(ids))


def test_tokenizer_ids_and_chat_template_match_transformers(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    export_model(lmkiln_model(tokenizer.vocab_size), tokenizer, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in ["alpha beta gamma 17.", "  théta — ∑ émoji 🙂\nnew line", ""]:
        assert hf(text)["input_ids"] == tokenizer.encode(text)
    assert hf.eos_token_id == tokenizer.eos_id and hf.pad_token_id == tokenizer.pad_id
    assert hf.bos_token_id == tokenizer.bos_id
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "alpha?"}]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nalpha?<|im_end|>\n<|im_start|>assistant\n"
    )
    rendered = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == expected == render_chat(tokenizer.chat_template, chat, add_generation_prompt=True)
    ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == tokenizer.encode_template(expected)
    assert ids.count(tokenizer.token_id("<|im_start|>")) == 3  # control tokens, not text
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_id, tokenizer.token_id("<|im_end|>")]


def test_verify_export_reports_agreement(tokenizer, tmp_path):
    model = lmkiln_model(tokenizer.vocab_size)
    export_model(model, tokenizer, tmp_path / "hf")
    report = verify_export(model, tokenizer, tmp_path / "hf")
    assert report.max_abs_logits_diff < TOL and report.tokens_equal and report.template_equal
    other = lmkiln_model(tokenizer.vocab_size)
    perturb(other, seed=7)  # a model that is not the exported one is caught
    assert verify_export(other, tokenizer, tmp_path / "hf").max_abs_logits_diff > 1e-3
    export_model(model, tokenizer, tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert verify_export(model, tokenizer, tmp_path / "bf16", "bfloat16").max_abs_logits_diff < TOL


def test_models_no_architecture_can_express_are_refused(tokenizer, tmp_path):
    with pytest.raises(LmkilnError, match="fits no Hugging Face architecture"):
        export_model(lmkiln_model(tokenizer.vocab_size, norm="layer"), tokenizer, tmp_path / "a")
    with pytest.raises(LmkilnError, match="GPT-2 has neither grouped-query"):
        export_model(
            lmkiln_model(tokenizer.vocab_size, **{**GPT2_STYLE, "n_kv_head": 2}), tokenizer, tmp_path / "b"
        )


# --------------------------------------------------------------------------------------------
# Import


def _hf_models():
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    return {
        "llama-gqa-tied": lambda v: LlamaForCausalLM(
            LlamaConfig(
                vocab_size=v,
                num_key_value_heads=2,
                tie_word_embeddings=True,
                max_position_embeddings=64,
                **shape,
            )
        ),
        "llama-head-dim-rope-llama3": lambda v: LlamaForCausalLM(
            LlamaConfig(
                vocab_size=v,
                num_key_value_heads=1,
                head_dim=24,
                max_position_embeddings=64,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
                **shape,
            )
        ),
        "mistral-sliding-window": lambda v: MistralForCausalLM(
            MistralConfig(
                vocab_size=v, num_key_value_heads=2, sliding_window=16, max_position_embeddings=64, **shape
            )
        ),
        "qwen2-tied": lambda v: Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=v,
                num_key_value_heads=2,
                tie_word_embeddings=True,
                max_position_embeddings=64,
                **shape,
            )
        ),
        "gpt2": lambda v: GPT2LMHeadModel(
            GPT2Config(
                vocab_size=v, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
            )
        ),
    }


@pytest.mark.parametrize(
    "name", ["llama-gqa-tied", "llama-head-dim-rope-llama3", "mistral-sliding-window", "qwen2-tied", "gpt2"]
)
def test_import_computes_what_transformers_computes(name, tokenizer, tmp_path):
    torch.manual_seed(0)
    hf = _hf_models()[name](tokenizer.vocab_size + 7).eval()  # padded vocabularies are common
    perturb(hf)
    hf.save_pretrained(str(tmp_path))
    tokenizer.save(tmp_path)
    model, tok, cfg, architecture = load_hf_model(tmp_path)
    assert architecture == type(hf).__name__ and tok.fingerprint == tokenizer.fingerprint
    ids = torch.randint(0, cfg.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff < TOL, diff
    if name.startswith("mistral"):
        assert cfg.sliding_window == 16
    if name.startswith("qwen2"):
        assert cfg.qkv_bias and cfg.tie_embeddings


def test_import_then_export_round_trips_the_files(tokenizer, tmp_path):
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
    )
    perturb(hf)
    hf.save_pretrained(str(tmp_path / "a"))
    tokenizer.save(tmp_path / "a")
    imported = load_hf_model(tmp_path / "a")
    export_model(imported.model, imported.tokenizer, tmp_path / "b")
    before, after = (
        load_file(str(tmp_path / "a" / "model.safetensors")),
        load_file(str(tmp_path / "b" / "model.safetensors")),
    )
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unsupported_architecture_lists_the_supported_ones(tokenizer, tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(str(tmp_path))
    tokenizer.save(tmp_path)
    with pytest.raises(
        LmkilnError,
        match=r"model_type 'bert' \(BertModel\) is not supported; lmkiln imports llama, mistral, qwen2, gpt2",
    ):
        load_hf_model(tmp_path)


def test_features_lmkiln_cannot_reproduce_are_refused(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
    )
    LlamaForCausalLM(config).save_pretrained(str(tmp_path))
    tokenizer.save(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(
        json.dumps({**saved, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})
    )
    with pytest.raises(LmkilnError, match="RoPE type 'yarn' is not implemented"):
        load_hf_model(tmp_path)
    path.write_text(json.dumps({**saved, "hidden_act": "gelu"}))
    with pytest.raises(LmkilnError, match="hidden_act 'gelu' is not silu"):
        load_hf_model(tmp_path)


def test_a_hub_id_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        LmkilnError, match="'meta-llama/Llama-3.2-1B' is not a local directory; lmkiln never downloads"
    ):
        load_hf_model("meta-llama/Llama-3.2-1B")
    with pytest.raises(LmkilnError, match="not a local directory"):
        load_pretrained("gpt2")


def test_pickle_checkpoints_are_refused(tokenizer, tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "n_embd": 32,
                "n_layer": 1,
                "n_head": 2,
                "vocab_size": tokenizer.vocab_size,
            }
        )
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    tokenizer.save(tmp_path)
    with pytest.raises(LmkilnError, match="pickle files, which lmkiln never loads"):
        load_hf_model(tmp_path)


# --------------------------------------------------------------------------------------------
# End to end through the CLI


@pytest.mark.slow
def test_continue_pretraining_a_hugging_face_llama_through_lmkiln_train(tokenizer, tmp_path):
    from test_train import synthetic_corpus
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(str(tmp_path / "hf"))
    tokenizer.save(tmp_path / "hf")
    corpus = synthetic_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    proc = run_cli(
        "train",
        f"train.init_from={tmp_path / 'hf'}",
        f"data.corpus={corpus}",
        f"train.run_dir={run}",
        "train.seq_len=32",
        "train.batch_size=8",
        "train.max_steps=30",
        "train.eval_every=30",
        "schedule.warmup_steps=3",
        "optim.lr=3e-3",
        "log.progress=off",
        "train.sample_tokens=0",
        cwd=tmp_path,
        check=True,
    )
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [e["val_loss"] for e in evals if e["event"] == "eval"]
    assert val[0] > 5.0 and val[-1] < val[0] - 2.0, val  # from ~ln(320) for the random model, a stated margin
    assert "LlamaForCausalLM" in proc.stderr
    saved = (run / "config.yaml").read_text()
    assert "n_kv_head: 2" in saved and "kind: file" in saved
    # the trained run goes back out to transformers
    out = run_cli(
        "export", str(run), "--to", "hf", str(tmp_path / "out"), "--verify", cwd=tmp_path, check=True
    )
    assert "LlamaForCausalLM" in out.stdout and "→ ok" in out.stdout


def test_init_from_rejects_a_context_shorter_than_seq_len(tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmkiln.config import load_config
    from lmkiln.tasks.pretrain import pretrain

    GPT2LMHeadModel(
        GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    ).save_pretrained(str(tmp_path / "hf"))
    tokenizer.save(tmp_path / "hf")
    cfg = load_config(
        overrides=[
            f"train.init_from={tmp_path / 'hf'}",
            "train.seq_len=32",
            f"train.run_dir={tmp_path / 'run'}",
        ]
    )
    with pytest.raises(
        LmkilnError,
        match=r"train.seq_len \(32\) is longer than the model's maximum context model.block_size \(16\)",
    ):
        pretrain(cfg)


def test_init_from_an_lmkiln_run_starts_from_its_weights(tmp_path):
    from test_train import tiny_cfg

    from lmkiln.tasks.pretrain import pretrain

    first = pretrain(tiny_cfg(tmp_path, "train.max_steps=10", "train.eval_every=10"))
    cfg = tiny_cfg(
        tmp_path,
        "train.max_steps=2",
        "train.eval_every=2",
        f"train.init_from={first.run_dir}",
        f"train.run_dir={tmp_path / 'second'}",
        "model.n_layer=1",  # the shape comes from the source run, whatever the config says
        "tokenizer.vocab_size=500",
    )
    second = pretrain(cfg)
    assert second.cfg.model.n_layer == first.cfg.model.n_layer
    assert second.tokenizer.fingerprint == first.tokenizer.fingerprint
    assert second.fit.first_eval["val_loss"] == pytest.approx(first.fit.last_eval["val_loss"], abs=1e-6)


def test_cli_mistakes_are_one_line_errors(tmp_path, capsys):
    from lmkiln.cli import main

    assert main(["export", str(tmp_path / "missing"), "--to", "hf", str(tmp_path / "out")]) == 2
    assert "error: run directory not found" in capsys.readouterr().err
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "hello"}\n')
    assert (
        main(["embed", "sentence-transformers/all-MiniLM-L6-v2", "--data", str(texts), "--out", "e.npy"]) == 2
    )
    assert "is not a local directory; lmkiln never downloads" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--to", "hf", str(tmp_path / "o"), "--max-shard-size", "lots"]) == 2
    assert "cannot read the size 'lots'" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_a_hugging_face_llama_with_lora(tokenizer, tmp_path):
    """`lmkiln finetune --base HF_DIR`: the base loads through the importer and LoRA trains on it."""
    from finetune_helpers import write_jsonl
    from test_finetune_cli import mapping_rows
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "hf"))
    tokenizer.save(tmp_path / "hf")
    data = write_jsonl(tmp_path / "task.jsonl", mapping_rows(200, seed=1))
    run = tmp_path / "sft"
    proc = run_cli(
        "finetune",
        "--base",
        str(tmp_path / "hf"),
        "--data",
        str(data),
        "--method",
        "lora",
        "train.max_epochs=3",
        "optim.lr=1e-2",
        "finetune.eval_samples=4",
        f"train.run_dir={run}",
        "log.progress=off",
        check=True,
    )
    assert "LlamaForCausalLM" in proc.stderr
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [h["val_loss"] for h in history if h["event"] == "eval"]
    assert evals[-1] < evals[0] - 0.5, evals  # the random base learns the task through its adapters
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
