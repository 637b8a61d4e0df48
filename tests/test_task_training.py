"""Task training on variable-length examples: padded batches without a mask equal masked ones,
length-grouped epochs stay exact, packing fills its rows, and `--base scratch` learns a task."""

from __future__ import annotations

import random

import numpy as np
import torch
from finetune_helpers import PARTNER, WORDS, write_jsonl

from lmkiln.config import ModelConfig, load_config
from lmkiln.data.loader import IGNORE_INDEX, EpochBatches, pad_collate
from lmkiln.data.task_examples import TokenExample, pack_plan, padded_collate, real_tokens
from lmkiln.model.transformer import Transformer
from lmkiln.tasks.finetune import finetune


def examples(n: int, seed: int = 0) -> list[TokenExample]:
    """Examples of 3..40 tokens whose first half is prompt (no labels)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 40)
        ids = [rng.randrange(1, 50) for _ in range(length)]
        labels = [IGNORE_INDEX] * (length // 2) + [rng.randrange(1, 50) for _ in range(length - length // 2)]
        out.append(TokenExample(ids, labels))
    return out


def test_padded_batches_without_a_mask_give_the_masked_loss_and_gradients():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, block_size=64))
    data = examples(6)
    fast = padded_collate(data, pad_id=0)([0, 1, 2, 3, 4, 5, -1])
    assert "attention_mask" not in fast and real_tokens(fast) == sum(len(e.input_ids) for e in data)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in data] + [
        {"input_ids": [0], "labels": [IGNORE_INDEX]}
    ]
    masked = pad_collate(rows, 0, side="right")  # the reference: explicit mask and positions

    def loss_and_grads(batch, **inputs):
        model.zero_grad()
        loss = model(batch["input_ids"], targets=batch["labels"], **inputs)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(fast)
    ref_loss, ref_grads = loss_and_grads(
        masked, attention_mask=masked["attention_mask"], position_ids=masked["position_ids"]
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5)


def padding_share(batches: EpochBatches, lengths: list[int], steps: int) -> float:
    padded = real = 0
    for _ in range(steps):
        picked = [lengths[i] for i in next(batches) if i >= 0]
        padded += max(picked) * len(picked)
        real += sum(picked)
    return 1 - real / padded


def test_length_grouped_epochs_cover_every_example_once_and_pad_less():
    lengths = [random.Random(i).randint(5, 120) for i in range(1000)]
    grouped = EpochBatches(1000, 32, 32, seed=3, lengths=lengths)
    seen = [i for _ in range(grouped.steps_per_epoch) for i in next(grouped) if i >= 0]
    assert sorted(seen) == list(range(1000))  # every example once, the short last step included
    assert grouped.epoch == 1
    plain = padding_share(EpochBatches(1000, 32, 32, seed=3), lengths, 31)
    share = padding_share(EpochBatches(1000, 32, 32, seed=3, lengths=lengths), lengths, 31)
    assert share < 0.15 < plain, (share, plain)  # random batches of 5..120 tokens pad ~45%
    again = EpochBatches(1000, 32, 32, seed=3, lengths=lengths)
    again.load_state_dict({"epoch": 0, "index": 5, "seed": 3})
    fresh = EpochBatches(1000, 32, 32, seed=3, lengths=lengths)
    for _ in range(5):
        next(fresh)
    assert next(again) == next(fresh)  # resuming mid-epoch gives the same batches


def test_packing_fills_rows_best_fit_decreasing():
    lengths = np.random.default_rng(0).integers(10, 90, size=2000).tolist()
    rows = pack_plan(lengths, 128, seed=0)
    assert sorted(i for row in rows for i in row) == list(range(2000))
    used = [sum(lengths[i] for i in row) for row in rows]
    assert max(used) <= 128
    assert sum(lengths) / (128 * len(rows)) >= 0.9, sum(lengths) / (128 * len(rows))


def test_translation_from_scratch_in_a_time_budget_learns(tmp_path):
    rng = random.Random(0)
    rows = []
    for _ in range(400):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
        rows.append({"source": " ".join(words), "target": " ".join(PARTNER[w] for w in words)})
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_config(
        recipe="translation-scratch",
        overrides=[
            f"finetune.data={data}",
            f"train.run_dir={tmp_path / 'run'}",
            "finetune.source_language=English",
            "finetune.target_language=Partner",
            "finetune.scratch_preset=tiny",
            "finetune.scratch_vocab=300",
            "finetune.max_length=64",
            "finetune.val_fraction=0.1",
            "finetune.eval_samples=0",
            "train.max_time=6s",
            "train.batch_size=16",
            "train.eval_every=100000",
            "schedule.warmup_steps=5",
            "optim.lr=3e-3",
            "log.progress=off",
            "log.plot=false",
        ],
    )
    result = finetune(cfg)
    assert result.fit.stop_reason == "max_time"
    assert (result.run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert result.cfg.model.vocab_size == result.tokenizer.vocab_size <= 300
    first, last = result.fit.first_eval["val_loss"], result.fit.last_eval["val_loss"]
    assert last < first - 2.0, (first, last)  # from ~5.7 (uniform over the vocabulary) to a learned map
