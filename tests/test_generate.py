"""Generation: the KV cache changes nothing, batches equal single prompts, stop strings and streaming."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from lmkiln.config import ModelConfig
from lmkiln.data.tokenizer import train_char
from lmkiln.infer.generate import generate_text
from lmkiln.model.generate import Sampling, filter_logits, generate_ids
from lmkiln.model.transformer import Transformer

TEXT = "the cat sat on the mat. the dog sat on the log. " * 20


@pytest.fixture(scope="module")
def tok():
    return train_char(iter([TEXT]))


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=96)
    return Transformer(cfg).eval()


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(max_new_tokens=30, temperature=0),
        Sampling(max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.9, seed=7),
    ],
)
def test_kv_cache_generation_equals_full_recomputation(model, tok, sampling):
    prompts = [tok.encode("the cat"), tok.encode("a dog sat on")]
    cached = generate_ids(model, prompts, sampling, eos_id=None, use_cache=True)
    recomputed = generate_ids(model, prompts, sampling, eos_id=None, use_cache=False)
    assert cached == recomputed and all(len(row) == 30 for row in cached)


def test_a_batch_of_left_padded_prompts_equals_each_prompt_alone(model, tok):
    prompts = [tok.encode("the cat sat"), tok.encode("a"), tok.encode("on the mat the")]
    greedy = Sampling(max_new_tokens=12, temperature=0)
    together = generate_ids(model, prompts, greedy, eos_id=None)
    alone = [generate_ids(model, [p], greedy, eos_id=None)[0] for p in prompts]
    assert together == alone


def test_same_seed_same_sample_and_top_k_one_is_greedy(model, tok):
    prompt = [tok.encode("the")]
    a = generate_ids(model, prompt, Sampling(max_new_tokens=20, temperature=1.0, seed=3), eos_id=None)
    b = generate_ids(model, prompt, Sampling(max_new_tokens=20, temperature=1.0, seed=3), eos_id=None)
    assert a == b
    top1 = generate_ids(
        model, prompt, Sampling(max_new_tokens=20, temperature=1.0, top_k=1, seed=4), eos_id=None
    )
    assert top1 == generate_ids(model, prompt, Sampling(max_new_tokens=20, temperature=0), eos_id=None)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=1.0)).sum() == 3


def test_generation_stops_at_eos_and_eos_is_not_output(model, tok):
    greedy = Sampling(max_new_tokens=40, temperature=0)
    free = generate_ids(model, [tok.encode("the")], greedy, eos_id=None)[0]
    eos = free[5]  # pretend the 6th generated token is the end of text
    stopped = generate_ids(model, [tok.encode("the")], greedy, eos_id=eos)[0]
    assert stopped == free[: free.index(eos)]


def test_stop_strings_and_streaming(model, tok):
    greedy = Sampling(max_new_tokens=40, temperature=0)
    full = generate_text(model, tok, ["the cat"], greedy)[0]
    stop = full[10:13]
    pieces: list[str] = []
    text = generate_text(
        model,
        tok,
        ["the cat"],
        Sampling(max_new_tokens=40, temperature=0, stop=[stop]),
        on_text=lambda row, delta: pieces.append(delta),
    )[0]
    assert text == full[: full.index(stop)]
    assert "".join(pieces) == text  # streamed deltas add up to the result, the stop string never shown


def test_importing_lmkiln_loads_no_heavy_optional_library():
    code = (
        "import sys, lmkiln, lmkiln.cli, lmkiln.config, lmkiln.tasks; "
        "heavy = {'transformers', 'peft', 'datasets', 'sklearn', 'tensorboard', 'sacrebleu', 'pyarrow'}; "
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"


def test_tensorboard_logging_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from test_train import tiny_cfg

    from lmkiln.tasks.pretrain import pretrain

    pretrain(tiny_cfg(tmp_path, "train.max_steps=4", "train.log_every=2", "log.tensorboard=true"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train/loss")] == [2, 4]
