"""Preference tuning: DPO/ORPO losses against TRL, the reference without a second model, bad
input, and a synthetic task on which held-out preference accuracy and the chosen style rise."""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch
from finetune_helpers import make_base, write_jsonl

from benchmarks import preference as synthetic
from lmkiln.config import FinetuneConfig
from lmkiln.data.formats import Record, read_records
from lmkiln.data.loader import IGNORE_INDEX
from lmkiln.data.preference import PreferencePair, encode_pairs, preference_collate
from lmkiln.data.task_examples import ExampleEncoder
from lmkiln.errors import LmkilnError
from lmkiln.finetune.preference import adapters_disabled, precompute_reference
from lmkiln.runs.load import load_run
from lmkiln.train.preference import PreferenceLoss, dpo_losses, sequence_logps

PAIRS = [
    {"prompt": "red cat means", "chosen": " red cat", "rejected": " cat red"},
    {"prompt": "sun dog means", "chosen": " sun dog", "rejected": " dog sun dog"},
    {"prompt": "blue means", "chosen": " blue tree moon", "rejected": " moon"},
]


def _pairs(tmp_path, rows=PAIRS) -> tuple[object, list[PreferencePair]]:
    loaded = load_run(make_base(tmp_path / "base"))
    cfg = FinetuneConfig(format="preference", objective="dpo")
    records = read_records(write_jsonl(tmp_path / "pairs.jsonl", rows), cfg)
    pairs, _ = encode_pairs(ExampleEncoder(loaded.tokenizer, cfg, 96), records, "train")
    return loaded, pairs


def _trl_inputs(pairs: list[PreferencePair], pad: int) -> dict[str, torch.Tensor]:
    """The batch TRL's DPOTrainer builds: full sequences (chosen rows, then rejected) and a
    completion mask over the reply tokens, right-padded."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(len(r.input_ids) + 1 for r in rows)
    input_ids = torch.full((len(rows), width), pad)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        full = row.input_ids + [row.labels[-1]]  # the last label is EOS, always trained
        input_ids[i, : len(full)] = torch.tensor(full)
        attention[i, : len(full)] = 1
        completion[i, 1 : len(full)] = torch.tensor([int(t != IGNORE_INDEX) for t in row.labels])
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def _as_hf_model(model: torch.nn.Module):
    """lmkiln's model behind the call TRL makes: model(input_ids=, labels=, fused_lm_head=True)."""

    def forward(input_ids, attention_mask, labels, **kwargs):
        logits = model(input_ids, attention_mask=attention_mask)[:, :-1].float()  # (N, T-1, V)
        targets = labels[:, 1:]
        logps = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        logps = logps * (targets != -100)
        return types.SimpleNamespace(
            log_probs=logps,
            entropy=torch.zeros_like(logps),
            mean_logits=logits.mean(-1),
            is_top1=logits.argmax(-1) == targets,
        )

    return forward


def _trl_dpo_loss(inputs: dict, model, beta: float) -> torch.Tensor:
    from accelerate import Accelerator  # noqa: F401  (TRL's own dependency; fails loudly if absent)
    from trl import DPOTrainer

    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False).detach()


def test_dpo_loss_equals_trls_dpo_trainer_on_a_fixed_batch(tmp_path):
    pytest.importorskip("trl")
    loaded, pairs = _pairs(tmp_path)
    reference = torch.tensor([[-30.0, -28.5], [-25.0, -31.0], [-40.0, -12.0]])
    batch = preference_collate(pairs, loaded.tokenizer.eos_id, reference)(list(range(len(pairs))))
    ours = PreferenceLoss("dpo", beta=0.3).pair_terms(loaded.model, batch).loss.mean().detach()
    inputs = _trl_inputs(pairs, loaded.tokenizer.eos_id)
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = reference[:, 0], reference[:, 1]
    theirs = _trl_dpo_loss(inputs, _as_hf_model(loaded.model), beta=0.3)
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert float(ours) > 0.1  # a real loss, not a degenerate 0 = 0


def test_label_smoothing_is_conservative_dpo():
    chosen, rejected = torch.tensor([-3.0, -9.0]), torch.tensor([-5.0, -2.0])
    ref_c, ref_r = torch.tensor([-4.0, -4.0]), torch.tensor([-4.0, -4.0])
    loss, _, _ = dpo_losses(chosen, rejected, ref_c, ref_r, beta=0.5, label_smoothing=0.2)
    logits = 0.5 * ((chosen - ref_c) - (rejected - ref_r))
    expected = -0.8 * torch.nn.functional.logsigmoid(logits) - 0.2 * torch.nn.functional.logsigmoid(-logits)
    torch.testing.assert_close(loss, expected)


def test_orpo_loss_equals_trls_odds_ratio_and_mean_logps(tmp_path):
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    loaded, pairs = _pairs(tmp_path)
    batch = preference_collate(pairs, loaded.tokenizer.eos_id)(list(range(len(pairs))))
    terms = PreferenceLoss("orpo", beta=0.25).pair_terms(loaded.model, batch)
    # TRL's mean per-token log-prob of each reply, from the same logits
    inputs = _trl_inputs(pairs, loaded.tokenizer.eos_id)
    logits = loaded.model(inputs["input_ids"], attention_mask=inputs["attention_mask"]).float()
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    trainer = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device="cpu"))
    mean_logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    chosen_mean, rejected_mean = mean_logps.chunk(2)
    odds_terms = ORPOTrainer.odds_ratio_loss(trainer, chosen_mean, rejected_mean)[0]
    expected = -chosen_mean - odds_terms  # TRL: nll - beta * log σ(log odds)
    torch.testing.assert_close(terms.loss, expected, atol=1e-5, rtol=0)


def test_reference_without_a_second_model(tmp_path):
    """LoRA: the trained model with adapters disabled scores as the base; full: precomputed once."""
    from peft import LoraConfig, get_peft_model

    loaded, pairs = _pairs(tmp_path)
    batch = preference_collate(pairs, loaded.tokenizer.eos_id)(list(range(len(pairs))))
    base_logps = sequence_logps(loaded.model, batch)[0].detach()
    precomputed = precompute_reference(loaded.model, pairs, 2, loaded.tokenizer.eos_id, torch.device("cpu"))
    torch.testing.assert_close(precomputed, torch.stack(base_logps.chunk(2), dim=1))

    peft_model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["wqkv", "wo"]))
    for name, param in loaded.model.named_parameters():
        if "lora_B" in name:  # adapters that change the model
            torch.nn.init.normal_(param, std=0.5)
    adapted = sequence_logps(loaded.model, batch)[0].detach()
    assert (adapted - base_logps).abs().max() > 1e-3
    reference = adapters_disabled(peft_model)(loaded.model, batch)
    torch.testing.assert_close(reference, base_logps)
    assert not reference.requires_grad


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "red", "chosen": " red"}, "pairs.jsonl:1: missing field 'rejected'"),
        ({"prompt": "red", "rejected": " red"}, "pairs.jsonl:1: missing field 'chosen'"),
        (
            {"prompt": "red", "chosen": " cat", "rejected": " cat "},
            "pairs.jsonl:1: 'chosen' and 'rejected' are identical",
        ),
        ({"prompt": "red " * 120, "chosen": " cat", "rejected": " dog"}, "pairs.jsonl:1: the prompt has"),
    ],
)
def test_bad_pairs_name_file_and_line(tmp_path, row, message):
    with pytest.raises(LmkilnError, match=message.replace("(", r"\(")) as err:
        _pairs(tmp_path, [row])
    assert "\n" not in str(err.value)


def test_collate_puts_chosen_rows_first_and_weights_padding_slots(tmp_path):
    loaded, pairs = _pairs(tmp_path)
    batch = preference_collate(pairs, loaded.tokenizer.eos_id, torch.tensor([[1.0, 2.0]] * 3))([2, -1])
    assert batch["input_ids"].shape[0] == 4
    assert batch["pair_weight"].tolist() == [1.0, 0.0]
    assert batch["ref_logps"].tolist() == [1.0, 0.0, 2.0, 0.0]
    chosen_labels = [t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]
    assert chosen_labels == [t for t in pairs[2].chosen.labels if t != IGNORE_INDEX]
    assert PreferenceLoss().count(batch) == 1


def test_dpo_raises_heldout_preference_accuracy_and_the_chosen_style(tmp_path):
    """SFT on both reply styles, then DPO towards one: held-out accuracy 0.5 → ≥ 0.9, the loss
    drops, and greedy replies move to the chosen style."""
    base = synthetic.sft_base(tmp_path, examples=300, steps=300)
    pairs, heldout = synthetic.preference_files(tmp_path, 200, 40)
    loaded = load_run(base)
    before = synthetic.chosen_style_rate(loaded.model, loaded.tokenizer, heldout)
    result = synthetic.preference_run(
        base,
        pairs,
        heldout,
        tmp_path / "dpo",
        "finetune.objective=dpo",
        "optim.lr=3e-4",
        "train.max_steps=60",
    )
    first, last = result.fit.first_eval, result.fit.last_eval
    assert first["val_accuracy"] == 0.5  # the policy is its reference: every margin is 0
    assert last["val_accuracy"] >= 0.9
    assert last["val_loss"] < first["val_loss"] - 0.2  # from log 2 = 0.693
    after = synthetic.chosen_style_rate(result.model, result.tokenizer, heldout)
    assert after >= 0.85 and after >= before + 0.2, (before, after)
    from lmkiln.eval.runner import evaluate_run  # the same pairs through `lmkiln eval --task preference`

    scored = evaluate_run(result.run_dir, str(heldout), "preference")
    assert scored.examples == 40 and scored.metrics["accuracy"] >= 0.9
    assert scored.metrics["logps_chosen"] > scored.metrics["logps_rejected"]
    logged = [r for r in _records(result.run_dir) if r.get("event") == "train"]
    assert {"reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected"} <= set(logged[-1])


def _records(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_record_of_a_pair_keeps_both_replies(tmp_path):
    cfg = FinetuneConfig(format="preference", objective="orpo", fields=["prompt=question"])
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}])
    assert read_records(path, cfg) == [Record(f"{path}:1", {"prompt": "q"}, ["a", "b"])]


@pytest.mark.parametrize(
    "method",
    [("finetune.objective=dpo",), ("finetune.objective=dpo", "finetune.method=lora", "finetune.lora_r=4")],
)
def test_preference_runs_resume_exactly(tmp_path, method):
    """Killed inside step 5 (checkpoint at 3) and resumed: the weights equal an unbroken run's,
    with the reference precomputed again (full) or taken from disabled adapters (LoRA)."""
    from finetune_helpers import ft_config

    from lmkiln.tasks.finetune import finetune

    base = make_base(tmp_path / "base")
    rows = [
        {"prompt": synthetic.prompt(w), "chosen": synthetic.chosen(w), "rejected": synthetic.rejected(w)}
        for w in synthetic.word_lists(40, 5)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    overrides = (
        "finetune.format=preference",
        "train.monitor=val_accuracy",
        "train.monitor_mode=max",
        *method,
    )
    done = finetune(ft_config(base, data, tmp_path / "a", *overrides))
    calls = {"n": 0}
    original = PreferenceLoss.__call__

    def crash(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # the evaluations call pair_terms, not the objective
            raise RuntimeError("simulated crash")
        return original(self, model, batch)

    PreferenceLoss.__call__ = crash
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            finetune(ft_config(base, data, tmp_path / "b", *overrides))
    finally:
        PreferenceLoss.__call__ = original
    resumed = finetune(ft_config(base, data, tmp_path / "b", *overrides), resume="auto")
    events = [e for e in _records(tmp_path / "b") if e["event"] == "resume"]
    assert [e["step"] for e in events] == [3]
    assert resumed.fit.state.step == done.fit.state.step == 6
    for name, tensor in done.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    assert resumed.fit.last_eval == done.fit.last_eval


CHAT_PAIRS = [
    {
        "messages": [
            {"role": "system", "content": "Reply in words."},
            {"role": "user", "content": "red cat"},
            {"role": "assistant", "content": "red cat"},
            {"role": "user", "content": "sun dog"},
        ],
        "chosen": [{"role": "assistant", "content": "sun dog"}],  # TRL's conversational format
        "rejected": "dog sun",
    },
    {"messages": [{"role": "user", "content": "blue tree"}], "chosen": "blue tree", "rejected": "tree blue"},
]


def test_conversation_prompts_train_only_the_final_reply(tmp_path):
    """Rows with messages: the chat template renders the prompt, an earlier assistant turn is
    context (untrained), and the reply with its end-of-turn token is what the pair compares."""
    from finetune_helpers import ft_config

    from lmkiln.tasks.finetune import finetune

    base = make_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_PAIRS * 8)
    overrides = ("finetune.format=preference", "finetune.objective=orpo", "train.monitor=val_accuracy")
    result = finetune(ft_config(base, data, tmp_path / "run", *overrides, "train.max_steps=2"))
    tokenizer = result.tokenizer
    assert tokenizer.decode([tokenizer.eos_id]) == "<|im_end|>"
    cfg = FinetuneConfig(format="preference", objective="orpo")
    from lmkiln.data.templates import chat_template_of

    encoder = ExampleEncoder(tokenizer, cfg, 96, chat_template_of(tokenizer))
    records = read_records(data, cfg)[:1]
    pair = encode_pairs(encoder, records, "train")[0][0]
    for example, reply in ((pair.chosen, "sun dog"), (pair.rejected, "dog sun")):
        trained = [t for t in example.labels if t != IGNORE_INDEX]
        assert tokenizer.decode(trained) == reply + "<|im_end|>\n"  # as chat SFT trains a turn
        assert "red cat" in tokenizer.decode(example.input_ids)  # the earlier turn is context

    mixed = write_jsonl(tmp_path / "mixed.jsonl", [PAIRS[0], CHAT_PAIRS[1]])
    with pytest.raises(
        LmkilnError, match="mixed.jsonl:2: this row has messages while .*mixed.jsonl:1 does not"
    ):
        finetune(ft_config(base, mixed, tmp_path / "mixed", *overrides))
