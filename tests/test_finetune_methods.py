"""Fine-tuning methods: LoRA exactness, freezing, added tokens, classification heads, resume, loading."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from finetune_helpers import ft_config, make_base, reverse_rows, word_lists, write_jsonl

from lmkiln.config import FinetuneConfig, ModelConfig
from lmkiln.errors import LmkilnError
from lmkiln.finetune.methods import apply_method
from lmkiln.model.classifier import SequenceClassifier
from lmkiln.model.lora import lora_scaling, merge_lora_tensors
from lmkiln.model.transformer import Transformer
from lmkiln.runs.load import load_run
from lmkiln.runs.tensors import load_model_tensors, model_tensors
from lmkiln.tasks.finetune import finetune
from lmkiln.train.objectives import LanguageModelLoss
from lmkiln.train.optim import build_optimizer
from lmkiln.train.runtime import Runtime
from lmkiln.train.step import train_step

CPU = Runtime(torch.device("cpu"))
pytest.importorskip("peft")


def tiny_model(seed: int = 0, **kwargs) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=60, d_model=32, n_head=2, n_layer=2, block_size=32, **kwargs))


def lm_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 60, (4, 16), generator=g)
    return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)}


def train(model, steps: int = 5, lr: float = 1e-2) -> None:
    from lmkiln.config import OptimConfig

    optimizer = build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.1))
    for step in range(steps):
        train_step(model, LanguageModelLoss(), [lm_batch(step)], CPU, grad_clip=1.0)
        optimizer.step()
        optimizer.zero_grad()


def test_lora_at_initialisation_gives_the_base_outputs_exactly():
    base = tiny_model()
    model = copy.deepcopy(base)
    method = apply_method(model, model, FinetuneConfig(method="lora", lora_r=4), [])
    x = lm_batch(0)["input_ids"]
    assert torch.equal(model(x), base(x))
    # trainable = Σ r·(in + out) over the adapted Linear layers (wqkv, wo, w_gate_up, w_down)
    expected = sum(
        4 * (m.in_features + m.out_features)
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("wqkv", "wo", "w_gate_up", "w_down")
    )
    assert method.trainable == expected == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_trains_only_adapters_and_merged_equals_unmerged():
    model = tiny_model()
    ft = FinetuneConfig(method="lora", lora_r=4, lora_alpha=8, lora_dropout=0.1)
    method = apply_method(model, model, ft, [])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)  # the base never moves
    assert any(".lora_B." in k for k in changed)
    model.eval()
    x = lm_batch(9)["input_ids"]
    merged = tiny_model(seed=1)  # different weights, fully overwritten by the merge
    load_model_tensors(merged, merge_lora_tensors(model_tensors(model), lora_scaling(ft)), "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=0)
        peft_merged = method.peft_model.merge_and_unload()  # peft's own merge agrees with ours
        torch.testing.assert_close(peft_merged(x), merged(x), atol=1e-5, rtol=0)


def test_freezing_keeps_embeddings_and_first_blocks_fixed():
    model = tiny_model(tie_embeddings=False)
    method = apply_method(model, model, FinetuneConfig(method="freeze", freeze_layers=1), [])
    frozen = {"tok_embed.weight", *(k for k in model.state_dict() if k.startswith("blocks.0."))}
    assert method.trainable == sum(p.numel() for n, p in model.named_parameters() if n not in frozen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) == (name in frozen), name
    with pytest.raises(LmkilnError, match="needs finetune.method=freeze"):
        apply_method(tiny_model(), tiny_model(), FinetuneConfig(method="full", freeze_layers=1), [])


def test_last_token_and_mean_pooling_ignore_right_padding():
    backbone = tiny_model()
    short, long = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    for pooling in ("last", "mean"):
        head = SequenceClassifier(backbone, 3, pooling).eval()
        ids = torch.tensor([short + [0] * 3, long])
        mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])
        with torch.no_grad():
            batched = head(ids, attention_mask=mask)
            alone = head(torch.tensor([short]))
        torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=0)


def weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def crash_then_resume(base, data, run, *overrides):
    """Crash inside step 5 (after the checkpoint at step 3), resume with --resume auto."""
    calls = {"n": 0}
    original = LanguageModelLoss.__call__

    def crash(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 5 + 2:  # 5 training steps + the evaluations at steps 0 and 3
            raise RuntimeError("simulated crash")
        return original(self, model, batch)

    LanguageModelLoss.__call__ = crash
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            finetune(ft_config(base, data, run, *overrides))
    finally:
        LanguageModelLoss.__call__ = original
    resumed = finetune(ft_config(base, data, run, *overrides), resume="auto")
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resume"] == [3]  # it really resumed from step 3
    return resumed


@pytest.mark.parametrize(
    "method", [("finetune.method=full", "finetune.packing=true"), ("finetune.method=freeze",)]
)
def test_full_and_frozen_runs_resume_exactly(tmp_path, method):
    base = make_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", reverse_rows(60))
    done = finetune(ft_config(base, data, tmp_path / "a", *method))
    resumed = crash_then_resume(base, data, tmp_path / "b", *method)
    assert resumed.fit.state.step == done.fit.state.step == 6
    assert weights_hash(resumed.model) == weights_hash(done.model)


def test_lora_run_resumes_exactly_and_loads_merged(tmp_path):
    base = make_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", reverse_rows(60))
    lora = (
        "finetune.method=lora",
        "finetune.lora_r=4",
        "finetune.lora_dropout=0.1",
        "finetune.eval_samples=4",
    )
    done = finetune(ft_config(base, data, tmp_path / "a", *lora))
    assert done.fit.state.step == 6
    assert done.check["after"]["examples"] == 4 and "eos_rate" in done.check["after"]["metrics"]
    resumed = crash_then_resume(base, data, tmp_path / "b", *lora)
    assert resumed.fit.state.step == 6
    assert weights_hash(resumed.model) == weights_hash(done.model)

    # every consumer loads a plain Transformer with the adapters merged in
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        trained = done.model.eval()(x)
        for path in (tmp_path / "a", tmp_path / "a" / "merged"):
            loaded = load_run(path)
            assert type(loaded.model) is Transformer
            assert not any(".lora_" in k for k in loaded.model.state_dict())
            torch.testing.assert_close(loaded.model(x), trained, atol=1e-5, rtol=0)
    adapter = tmp_path / "a" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    from peft import PeftModel  # the adapter alone, on a fresh copy of the base, gives the same model

    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(load_run(base).model, str(adapter)).eval()
        torch.testing.assert_close(reloaded(x), trained, atol=1e-5, rtol=0)


def test_template_tokens_the_base_lacks_are_added_resized_and_trained(tmp_path):
    """A base tokenizer without ChatML markers: both are added, embeddings grow, only new rows move."""
    base = make_base(tmp_path / "base", chatml=False, tie=False)
    old = load_run(base)
    vocab = old.model.cfg.vocab_size
    rows = [
        {"messages": [{"role": "user", "content": " ".join(w)}, {"role": "assistant", "content": w[0]}]}
        for w in word_lists(20)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    for method in ("freeze", "lora"):
        run = tmp_path / method
        result = finetune(ft_config(base, data, run, "finetune.format=chat", f"finetune.method={method}"))
        assert result.method.new_rows == [vocab, vocab + 1]
        tok = result.tokenizer
        assert tok.token_id("<|im_start|>") == vocab and tok.eos_token == "<|im_end|>"
        loaded = load_run(run)
        assert loaded.model.cfg.vocab_size == vocab + 2 and loaded.tokenizer.vocab_size == vocab + 2
        # old rows stay fixed: the frozen input embedding (freeze; an untied lm_head trains), all under LoRA
        for name in ("tok_embed.weight", "lm_head.weight") if method == "lora" else ("tok_embed.weight",):
            new, before = loaded.model.state_dict()[name], old.model.state_dict()[name]
            assert torch.equal(new[:vocab], before), (method, name)
            mean = before.mean(dim=0)
            assert not torch.allclose(new[vocab], mean)  # new rows started at the mean and learned
        assert result.method.trainable >= 2 * 2 * loaded.model.cfg.d_model


def test_classification_head_trains_through_the_loop_and_loads(tmp_path):
    from lmkiln.eval.runner import evaluate_run
    from lmkiln.runs.load import load_classifier

    base = make_base(tmp_path / "base")
    rows = [
        {"text": " ".join(w), "label": "animal" if {"cat", "dog"} & set(w) else "other"}
        for w in word_lists(80)
    ]
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    run = tmp_path / "cls"
    result = finetune(
        ft_config(
            base, data, run, "finetune.format=classification", "finetune.method=lora", "train.max_steps=20"
        )
    )
    assert result.cfg.finetune.labels == ["animal", "other"]
    # in-loop metrics are val_<name> for every task (the one classification evaluator)
    assert {"val_loss", "val_accuracy", "val_f1_macro"} <= set(result.fit.last_eval)
    assert result.fit.last_eval["val_loss"] < result.fit.first_eval["val_loss"]
    head = result.method.trainable - sum(
        p.numel() for n, p in result.model.named_parameters() if ".lora_" in n
    )
    assert head == result.model.head.weight.numel() + result.model.head.bias.numel()
    model, _, _ = load_classifier(run)
    evaluated = evaluate_run(run, str(data), "classification")
    assert evaluated.examples == 80 and 0 <= evaluated.metrics["accuracy"] <= 1
    with pytest.raises(LmkilnError, match="classification run"):
        load_run(run)
    assert isinstance(model, SequenceClassifier)


def test_eval_runs_every_generation_task_and_perplexity(tmp_path):
    from lmkiln.eval.runner import evaluate_run, write_result

    base = make_base(tmp_path / "base")
    chats = [
        {"messages": [{"role": "user", "content": " ".join(w)}, {"role": "assistant", "content": w[0]}]}
        for w in word_lists(12)
    ]
    run = tmp_path / "chat"
    finetune(ft_config(base, write_jsonl(tmp_path / "chat.jsonl", chats), run, "finetune.format=chat"))
    tasks = {
        "chat": chats,
        "qa": [
            {"context": " ".join(w), "question": "first?", "answer": [w[0], w[0].upper()]}
            for w in word_lists(5)
        ],
        "translation": [
            {"source": " ".join(w), "target": w[0], "target_language": "X"} for w in word_lists(5)
        ],
        "summarization": [{"document": " ".join(w * 3), "summary": w[0]} for w in word_lists(5)],
        "perplexity": [{"text": " ".join(w)} for w in word_lists(5)],
    }
    for task, rows in tasks.items():
        data = write_jsonl(tmp_path / f"{task}.jsonl", rows)
        result = evaluate_run(
            run, str(data), task, max_new_tokens=4, batch_size=3, overrides=["finetune.source_language=Y"]
        )
        assert result.examples == len(rows), task
        assert ("perplexity" in result.metrics) if task == "perplexity" else ("eos_rate" in result.metrics)
        assert all(v == v for v in result.metrics.values()), (task, result.metrics)  # no NaN
        saved = write_result(result, tmp_path / f"{task}.json", {"run": str(run)})
        assert json.loads(saved.read_text())["task"] == task
