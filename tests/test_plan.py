"""`lmkiln plan`: its counts are exact, its memory prediction matches a measured process within
15%, its advice follows its inputs, and every bad input is one line."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
from conftest import run_cli
from test_cli import FAST, assert_user_error
from test_train import synthetic_corpus

from lmkiln.config import FinetuneConfig, ModelConfig, OptimConfig, build_config, load_config, parse_overrides
from lmkiln.errors import LmkilnError
from lmkiln.model.transformer import Transformer, count_parameters
from lmkiln.plan import parse_duration, parse_memory, plan_table, plan_training
from lmkiln.plan.measure import measure
from lmkiln.plan.memory import per_strategy, probe_activations, training_memory

SMALL = ModelConfig(n_layer=3, n_head=4, d_model=96, block_size=64, vocab_size=500)


def test_parameter_counts_equal_the_built_model():
    probe = probe_activations(SMALL, 32)
    model = Transformer(SMALL)
    assert probe.total_parameters == count_parameters(model) == probe.trainable_parameters
    assert probe.embedding_parameters == SMALL.vocab_size * SMALL.d_model


def test_lora_counts_only_adapters_as_trainable():
    lora = FinetuneConfig(method="lora", lora_r=4)
    probe = probe_activations(SMALL, 32, lora)
    # per block: wqkv (96→288), wo (96→96), w_gate_up (96→2·256), w_down (256→96), each A (r×in) + B (out×r)
    per_block = sum(4 * (i + o) for i, o in [(96, 288), (96, 96), (96, 512), (256, 96)])
    assert probe.trainable_parameters == SMALL.n_layer * per_block
    assert probe.total_parameters == count_parameters(Transformer(SMALL))


def test_checkpointing_keeps_only_each_block_input():
    probe = probe_activations(SMALL, 32)
    assert probe.per_block_checkpointed == 32 * SMALL.d_model * 4  # (T, C) fp32
    assert probe.per_block > 10 * probe.per_block_checkpointed
    plain = training_memory(SMALL, probe, 8, 32)
    checkpointed = training_memory(SMALL, probe, 8, 32, checkpointing=True)
    assert checkpointed.activations < plain.activations / 5


def test_activations_scale_with_micro_batch_and_sequence():
    short, long = probe_activations(SMALL, 16), probe_activations(SMALL, 32)
    assert long.per_block == pytest.approx(2 * short.per_block, rel=0.02)
    one, four = training_memory(SMALL, long, 1, 32), training_memory(SMALL, long, 4, 32)
    assert four.activations == 4 * one.activations


def test_optimizer_state_follows_the_optimizer():
    probe = probe_activations(SMALL, 16)
    adam, sgd, plain_sgd = (
        training_memory(SMALL, probe, 1, 16, OptimConfig(name=name, momentum=momentum))
        for name, momentum in (("adamw", 0.9), ("sgd", 0.9), ("sgd", 0.0))
    )
    assert adam.optimizer == 2 * sgd.optimizer == 2 * 4 * probe.trainable_parameters
    assert plain_sgd.optimizer == 0  # SGD without momentum keeps no state


def test_gradients_of_32_mib_or_more_never_count_as_heap():
    """glibc maps such blocks apart and unmaps them on free: they leave nothing in its heap."""
    wide = ModelConfig(n_layer=2, n_head=4, d_model=512, block_size=64, vocab_size=16384)
    assert probe_activations(wide, 16).mapped_gradients == 16384 * 512 * 4  # the tied embedding
    assert probe_activations(SMALL, 16).mapped_gradients == 0
    lora = probe_activations(wide, 16, FinetuneConfig(method="lora"))
    assert lora.mapped_gradients == 0  # the embedding is frozen


def test_strategies_shard_states_and_replicate_activations():
    probe = probe_activations(SMALL, 16)
    estimate = training_memory(SMALL, probe, 4, 16)
    parts = per_strategy(estimate, SMALL.n_layer, 4)
    assert parts["ddp"] > estimate.total > parts["fsdp"] > parts["fsdp_offload_device"]
    states = estimate.weights + estimate.gradients + estimate.optimizer
    assert parts["fsdp_offload_host"] == -(-states // 4)


def _live_tensor_peak(overrides: list[str]) -> tuple[int, object]:
    """The most tensor bytes alive at once during one training step (after two warm-up steps), by
    torch.profiler's memory timeline, with the plan of the same config."""
    import json

    from torch.profiler import ProfilerActivity, profile

    from lmkiln.config import resolve
    from lmkiln.plan.speed import build_workload
    from lmkiln.train.optim import build_optimizer
    from lmkiln.train.runtime import Runtime
    from lmkiln.train.step import train_step

    cfg = build_config([("test", parse_overrides(overrides))])
    batch = resolve(cfg).batch
    runtime = Runtime.start(cfg.train, cfg.dist)
    work = build_workload(cfg, cfg.model, batch.micro_batch_size, runtime.device)
    optimizer = build_optimizer(work.model.train(), cfg.optim)

    def step() -> None:
        train_step(work.model, work.objective, [work.batch] * batch.accumulation, runtime, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(), step()
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    with tempfile.TemporaryDirectory() as out:
        prof.export_memory_timeline(f"{out}/timeline.json", device="cpu")
        _, sizes = json.loads(Path(out, "timeline.json").read_text())
    live = max(sum(categories) for categories in sizes) - sum(
        t.numel() * t.element_size() for t in work.batch.values()
    )
    plan = (plan_table if cfg.task == "supervised" else plan_training)(
        cfg, calibrate_steps=0, measure_overhead=False
    )
    return live, plan.memory


TRANSFORMER = ["model.n_layer=3", "model.d_model=128", "model.n_head=4", "model.vocab_size=1024",
               "model.block_size=64", "train.seq_len=64", "train.batch_size=8"]  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [
        TRANSFORMER,  # peak at the end of forward: activations and logits
        [*TRANSFORMER, "train.activation_checkpointing=true"],  # peak in backward
        [*TRANSFORMER, "train.micro_batch_size=2"],  # the gradients exist during forward
        [
            "task=supervised",
            "mlp.inputs=256",
            "mlp.hidden=[512,512]",
            "mlp.outputs=10",
            "train.batch_size=64",
        ],  # fmt: skip  # peak at the end of backward: the gradients
    ],
    ids=["forward", "checkpointed", "accumulating", "mlp"],
)
@pytest.mark.filterwarnings("ignore:`export_memory_timeline` is deprecated:FutureWarning")
def test_predicted_tensors_match_the_profilers_live_peak(overrides):
    """The parts that never peak together are not added: the prediction is the live peak itself."""
    live, memory = _live_tensor_peak(overrides)
    assert abs(memory.tensors / live - 1) <= 0.05, (live / 2**20, memory.parts())


# Measured against a fresh process: each pair is one config; the predicted peak (with the runtime
# overhead measured on this machine) must be within 15% of the measured high-water mark.
MEASURED = [
    ["model.n_layer=2", "model.d_model=128", "model.n_head=4", "model.vocab_size=2048",
     "model.block_size=128", "train.seq_len=128", "train.batch_size=16"],
    ["model.n_layer=4", "model.d_model=192", "model.n_head=4", "model.vocab_size=4096",
     "model.block_size=128", "train.seq_len=128", "train.batch_size=8",
     "train.activation_checkpointing=true"],
]  # fmt: skip


@pytest.mark.slow
def test_predicted_peak_memory_is_within_15_percent_of_measured_runs():
    for overrides in MEASURED:  # one test: the runtime overhead is measured once, then cached
        plan = plan_training(build_config([("test", parse_overrides(overrides))]), calibrate_steps=0)
        measured = measure(overrides, steps=4)["peak_mb"] * 2**20
        assert plan.memory.runtime > 0  # measured once on this machine
        assert abs(measured / plan.memory.total - 1) <= 0.15, (
            overrides,
            measured / 2**20,
            plan.memory.parts(),
        )


def test_calibrated_time_covers_the_configured_steps():
    cfg = build_config([("test", parse_overrides(["model.preset=tiny", "model.vocab_size=300",
                                                  "train.seq_len=32", "train.batch_size=4",
                                                  "train.max_steps=50"]))])  # fmt: skip
    plan = plan_training(cfg, data_tokens=100_000, calibrate_steps=2, measure_overhead=False)
    assert plan.calibration.step_seconds > 0
    assert plan.train_seconds == pytest.approx(50 * plan.calibration.step_seconds)
    assert plan.tokens_per_s == pytest.approx(4 * 32 / plan.calibration.step_seconds)


def _tiny(*extra: str):
    return build_config([("test", parse_overrides(["model.preset=tiny", "model.vocab_size=300",
                                                   "train.seq_len=64", "train.batch_size=16", *extra]))])  # fmt: skip


def test_a_memory_limit_picks_a_micro_batch_that_fits():
    full = plan_training(_tiny(), calibrate_steps=0, measure_overhead=False)
    limit = int(full.memory.total * 0.6)
    fitted = plan_training(_tiny(), memory_limit=limit, calibrate_steps=0, measure_overhead=False)
    assert fitted.memory.total <= limit and fitted.micro_batch < 16
    assert fitted.micro_batch * fitted.accumulation == 16
    assert any("train.micro_batch_size=" in line for line in fitted.advice)


def test_a_memory_limit_below_every_configuration_says_what_to_change():
    with pytest.raises(LmkilnError, match="below the smallest configuration.*raise --memory"):
        plan_training(_tiny(), memory_limit=1000, calibrate_steps=0, measure_overhead=False)


def test_many_passes_over_the_data_are_flagged_and_a_size_recommended():
    plan = plan_training(_tiny("train.max_steps=400"), data_tokens=20_000, calibrate_steps=1,
                         measure_overhead=False)  # fmt: skip
    assert plan.passes == pytest.approx(400 * 16 * 64 / 20_000)
    assert any("passes over the training data" in line for line in plan.advice)
    assert plan.recommended["parameters"] > 0
    # limited by data: never more than 4 passes at the recommended steps
    assert plan.recommended["max_steps"] * 16 * 64 <= 4 * 20_000


def test_a_larger_time_budget_recommends_a_larger_model():
    small = plan_training(
        _tiny(), data_tokens=10**9, time_budget=60, calibrate_steps=1, measure_overhead=False
    )
    large = plan_training(
        _tiny(), data_tokens=10**9, time_budget=6000, calibrate_steps=1, measure_overhead=False
    )
    assert large.recommended["parameters"] > small.recommended["parameters"]


def test_a_budget_that_fits_no_model_is_an_error():
    with pytest.raises(LmkilnError, match="fits no model"):
        plan_training(_tiny(), time_budget=1e-4, calibrate_steps=1, measure_overhead=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GiB", 24 * 2**30), ("512MB", 512 * 10**6), ("1.5gib", int(1.5 * 2**30)), ("100", 100)],
)
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


def test_durations_and_bad_units():
    assert parse_duration("10m") == 600 and parse_duration("90s") == 90 and parse_duration("2h") == 7200
    with pytest.raises(LmkilnError, match="--time"):
        parse_duration("ten minutes")
    with pytest.raises(LmkilnError, match="--memory"):
        parse_memory("24 parsecs")


@pytest.mark.slow
def test_plan_command_prints_every_part_and_the_advice(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus.txt", lines=300)
    proc = run_cli("plan", f"data.corpus={corpus}", *FAST, "train.max_steps=300", "--save", str(tmp_path / "p.json"),
                   cwd=tmp_path, check=True)  # fmt: skip
    out = proc.stdout
    for part in ("weights", "gradients", "optimizer", "activations", "logits", "runtime", "KV cache",
                 "FSDP2", "tok/s", "passes", "compute-optimal size"):  # fmt: skip
        assert part in out, (part, out)
    assert (tmp_path / "p.json").is_file()
    assert_user_error(run_cli("plan", f"data.corpus={corpus}", *FAST, "--memory", "1KiB", cwd=tmp_path),
                      "below the smallest configuration")  # fmt: skip
    assert_user_error(
        run_cli("plan", f"data.corpus={corpus}", *FAST, "--time", "soon", cwd=tmp_path), "--time"
    )


def test_plan_rejects_tasks_it_does_not_cover():
    cfg = load_config(overrides=["task=encoder"])
    with pytest.raises(LmkilnError, match="task=pretrain, task=finetune and task=supervised"):
        plan_training(cfg, calibrate_steps=0, measure_overhead=False)


def test_the_probe_model_is_small_whatever_the_vocabulary():
    big_vocab = dataclasses.replace(SMALL, vocab_size=50_000)
    a, b = probe_activations(SMALL, 16), probe_activations(big_vocab, 16)
    assert a.per_block == b.per_block and a.outside_blocks == b.outside_blocks
    assert b.total_parameters - a.total_parameters == (50_000 - 500) * SMALL.d_model


def _mlp(*extra: str):
    overrides = ["task=supervised", "mlp.inputs=32", "mlp.hidden=[64,48]", "mlp.outputs=5", *extra]
    return build_config([("test", parse_overrides(overrides))])


def test_an_mlp_plan_counts_its_layers_and_scales_activations_with_the_batch():
    plan = plan_table(_mlp("train.batch_size=16"), calibrate_steps=0, measure_overhead=False)
    weights = 32 * 64 + 64 * 48 + 48 * 5
    assert plan.parameters == weights + 64 + 48 + 5 and plan.linear_layers == 3
    assert plan.flops_per_example == 6 * weights
    assert plan.memory.weights == plan.memory.gradients == 4 * plan.parameters
    assert plan.memory.optimizer == 2 * 4 * plan.parameters  # AdamW's two moments
    double = plan_table(_mlp("train.batch_size=32"), calibrate_steps=0, measure_overhead=False)
    assert double.memory.activations == pytest.approx(2 * plan.memory.activations, rel=0.01)
    sgd = plan_table(_mlp("optim.name=sgd", "optim.momentum=0"), calibrate_steps=0, measure_overhead=False)
    assert sgd.memory.optimizer == 0


def test_an_mlp_plan_times_real_steps_and_needs_its_widths():
    plan = plan_table(
        _mlp("train.batch_size=8", "train.max_steps=40"), calibrate_steps=2, measure_overhead=False
    )
    assert plan.calibration.step_seconds > 0
    assert plan.train_seconds == pytest.approx(40 * plan.calibration.step_seconds)
    assert plan.examples_per_s == pytest.approx(8 / plan.calibration.step_seconds)
    with pytest.raises(LmkilnError, match="mlp.inputs and mlp.outputs"):
        plan_table(build_config([("test", parse_overrides(["task=supervised"]))]), calibrate_steps=0)


@pytest.mark.slow
def test_an_mlp_plan_reads_its_table_and_predicts_a_measured_run_within_15_percent(tmp_path):
    proc = run_cli("plan", "--recipe", "digits-mlp", cwd=tmp_path, check=True)
    out = proc.stdout
    for part in ("MLP 64→128→10", "training /", "weights", "runtime", "FSDP2",
                 "examples/s", "early stopping"):  # fmt: skip
        assert part in out, (part, out)
    # parameter-dominated, the kind of MLP whose memory is worth planning (20M parameters)
    overrides = ["task=supervised", "mlp.inputs=784", "mlp.hidden=[4096,4096]", "mlp.outputs=10",
                 "train.batch_size=256"]  # fmt: skip
    plan = plan_table(build_config([("test", parse_overrides(overrides))]), calibrate_steps=0)
    measured = measure(overrides, steps=4)["peak_mb"] * 2**20
    assert plan.memory.runtime > 0
    assert abs(measured / plan.memory.total - 1) <= 0.15, (measured / 2**20, plan.memory.parts())


@pytest.mark.distributed
def test_per_process_peaks_of_ddp_and_fsdp_match_two_measured_processes():
    overrides = MEASURED[0]  # batch 16: 8 sequences per process
    plan = plan_training(build_config([("test", parse_overrides(overrides))]), calibrate_steps=0)
    for strategy in ("ddp", "fsdp"):
        measured = measure([*overrides, f"dist.strategy={strategy}"], steps=4, processes=2)["peak_mb"]
        assert abs(measured * 2**20 / plan.strategies[strategy] - 1) <= 0.15, (strategy, measured)
