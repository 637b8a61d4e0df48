"""The benchmark code runs (timings themselves are never asserted): it has no other test, and a
change to lmkiln's interfaces once broke a section unnoticed."""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import Shape


def test_time_to_loss_adapter_gives_the_summed_loss_lmkiln_asks_for():
    from transformers import GPT2Config, GPT2LMHeadModel

    from benchmarks.time_to_loss import HFLogits
    from lmkiln.train.objectives import LanguageModelLoss

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    ids = torch.randint(0, 50, (2, 8))
    labels = torch.randint(0, 50, (2, 8))
    labels[0, :3] = -100
    expected = torch.nn.functional.cross_entropy(
        hf(input_ids=ids).logits.flatten(0, 1), labels.flatten(), reduction="sum"
    )
    loss = LanguageModelLoss()(HFLogits(hf), {"input_ids": ids, "labels": labels})
    torch.testing.assert_close(loss, expected)


@pytest.mark.slow
def test_gpu_section_runs_end_to_end_on_the_cpu():
    # bf16 autocast and torch.compile for lmkiln, the Trainer and the plain loop, on a tiny shape:
    # everything but the CUDA device itself, which this machine does not have.
    from benchmarks import gpu

    result = gpu.measure(True, torch.device("cpu"), {"tiny": Shape("tiny", 2, 2, 64, 32, 4, 128)})
    rows = result["shapes"]["tiny"]["rows"]
    assert set(rows) == {"lmkiln", "transformers", "plain_pytorch"}
    assert all(row["tokens_per_s"] > 0 and row["steps_timed"] > 0 for row in rows.values())


def test_data_audit_sections_run_on_small_sizes(tmp_path):
    from benchmarks import data_audit

    corpora = {"generated": ["plain words here " * 20] * 50}
    quality = data_audit.scrub_quality(20, corpora)
    assert all(row["recall"] >= 0.99 for row in quality["recall"].values())
    assert quality["false_positives_clean"]["generated"]["findings"] == 0
    memory = data_audit.dedup_memory(2_000, 300)
    assert 16 < memory["exact"]["bytes_per_document"] < 1_000 and memory["near"]["bytes_per_document"] > 512
    speed = data_audit.dedup_speed(300, 1)
    assert speed["mb_per_s"]["exact"] > 0 and speed["mb_per_s"]["near"] > 0
