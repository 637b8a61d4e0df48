"""GGUF export, checked by its real consumer: llama.cpp (llama-cpp-python) loads the files lmkiln
writes and must reproduce lmkiln's token ids, logits, greedy text and chat stops.

Models are tiny but trained (so top-1 predictions mean something) and 32-value aligned (q8_0
quantizes rows in blocks of 32): d_model 64, SwiGLU 192 / GELU 256 hidden.
"""

from __future__ import annotations

import logging
import random
import subprocess
from pathlib import Path

import pytest
import torch

from lmkiln import cli
from lmkiln.config import ModelConfig, load_config, to_dict
from lmkiln.data.templates import render_chat
from lmkiln.data.tokenizer import Tokenizer, train_bpe, train_char
from lmkiln.errors import LmkilnError
from lmkiln.interop.gguf_export import export_gguf, export_gguf_from, rope_interleave
from lmkiln.interop.gguf_verify import MIXED_TEXT, THRESHOLDS, llama_cpp_available, open_gguf, verify_gguf
from lmkiln.model.transformer import Transformer, apply_rope, rope_tables
from lmkiln.runs.checkpoint import CheckpointData, write_checkpoint
from lmkiln.runs.tensors import model_tensors
from lmkiln.train.state import TrainState

gguf = pytest.importorskip("gguf")
needs_llama_cpp = pytest.mark.skipif(
    not llama_cpp_available(), reason="llama-cpp-python is not installed (pip install 'lmkiln[llama]')"
)


@pytest.fixture(autouse=True)
def keep_logging():
    """cli.main points the root logger at the stderr of its moment (a capture that then closes)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


COLOR = dict(cat="red", dog="brown", bird="blue", fish="gold", tree="green", river="grey", cloud="white")
VERBS = ["sees", "likes", "follows", "finds", "watches", "paints"]
GPT2_STYLE = dict(norm="layer", position="learned", mlp="gelu", bias=True)


def sentence(rng: random.Random) -> str:
    a, b = rng.sample(sorted(COLOR), 2)
    return f"The {COLOR[a]} {a} {rng.choice(VERBS)} the {COLOR[b]} {b}."


def chat(noun: str) -> list[dict]:
    return [{"role": "user", "content": f"What color is the {noun}?"}]


def documents(tokenizer: Tokenizer, n: int, seed: int) -> list[list[int]]:
    """Paragraphs of plain sentences and ChatML conversations, each ending with EOS."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if i % 2:
            noun = rng.choice(sorted(COLOR))
            turns = [*chat(noun), {"role": "assistant", "content": f"The {noun} is {COLOR[noun]}."}]
            ids = tokenizer.encode_template(render_chat(tokenizer.chat_template, turns))
        else:
            ids = tokenizer.encode(" ".join(sentence(rng) for _ in range(3)))
        docs.append(ids + [tokenizer.eos_id])
    return docs


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    rng = random.Random(0)
    texts = [" ".join(sentence(rng) for _ in range(4)) for _ in range(300)] + [MIXED_TEXT[::-1], MIXED_TEXT]
    return train_bpe(iter(texts * 2), 420)


def train_tiny(tokenizer: Tokenizer, steps: int = 100, **overrides) -> Transformer:
    """A 2-layer model trained until its next-token predictions are confident (loss ~6 → ~0.4).

    One thread: for a model this small a second one only adds synchronisation, which on a loaded
    machine costs far more than it saves.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(tokenizer, steps, overrides)
    finally:
        torch.set_num_threads(threads)


def _train(tokenizer: Tokenizer, steps: int, overrides: dict) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=64, n_head=4, n_kv_head=2, n_layer=2, block_size=128
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    model = Transformer(cfg)
    stream = torch.tensor([t for doc in documents(tokenizer, 400, seed=1) for t in doc])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 65, (16,), generator=g)
        batch = torch.stack([stream[s : s + 65] for s in starts])
        loss = model(batch[:, :-1], targets=batch[:, 1:]) / batch[:, 1:].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.2 * losses[0], losses[::25]  # it learned
    return model.eval()


def save_run(directory: Path, model: Transformer, tokenizer: Tokenizer) -> Path:
    """A run directory as `lmkiln train` leaves one: tokenizer/ and a checkpoint."""
    cfg = load_config(overrides=[f"train.seq_len={model.cfg.block_size}"])
    cfg.model = model.cfg
    tokenizer.save(directory / "tokenizer")
    trainer = {"format": 1, "state": TrainState(step=7).to_dict(), "config": to_dict(cfg)}
    write_checkpoint(directory / "checkpoints", 7, CheckpointData(model_tensors(model), {}, {}, trainer))
    return directory


@pytest.fixture(scope="module")
def llama(tokenizer) -> Transformer:
    return train_tiny(tokenizer)


@pytest.fixture(scope="module")
def gpt2(tokenizer) -> Transformer:
    return train_tiny(tokenizer, **GPT2_STYLE, n_kv_head=0)


def held_out(tokenizer: Tokenizer) -> str:
    rng = random.Random(99)
    return " ".join(sentence(rng) for _ in range(12))


# --------------------------------------------------------------------------------------------
# The file itself (gguf's reader; no llama.cpp needed)


def test_metadata_and_tensor_layout(llama, tokenizer, tmp_path):
    path = tmp_path / "m.gguf"
    report = export_gguf(llama, tokenizer, path, dtype="q8_0")
    assert report.architecture == "llama" and report.tokenizer == "gpt2/gpt-2" and path.is_file()
    reader = gguf.GGUFReader(path)

    def field(key: str):
        value = reader.get_field(key)
        return value.contents() if value is not None else None

    cfg = llama.cfg
    assert field("general.architecture") == "llama"
    assert field("llama.context_length") == cfg.block_size
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.rope.freq_base") == cfg.rope_base
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    assert field("tokenizer.ggml.pre") == "gpt-2" and field("tokenizer.ggml.model") == "gpt2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and tokens[tokenizer.eos_id] == "<|endoftext|>"
    assert field("tokenizer.ggml.token_type")[tokenizer.eos_id] == gguf.TokenType.CONTROL
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_id
    assert field("tokenizer.ggml.eot_token_id") == tokenizer.token_id("<|im_end|>")
    assert field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd


def test_rope_interleave_preserves_attention_scores():
    """Rotate-half RoPE on lmkiln's rows = adjacent-pair RoPE on the permuted rows (llama.cpp's)."""
    D, T = 16, 5
    torch.manual_seed(0)
    w = torch.randn(2 * D, 8)  # two heads
    x = torch.randn(T, 8)
    cos, sin = rope_tables(D, T, 10000.0)
    ours = apply_rope((x @ w.t()).view(T, 2, D).transpose(0, 1), cos, sin)  # (2, T, D)
    theirs = (x @ rope_interleave(w, 2).t()).view(T, 2, D).transpose(0, 1)
    pairs = theirs.view(2, T, D // 2, 2)
    angle = torch.atan2(sin[:, : D // 2], cos[:, : D // 2])  # (T, D/2)
    c, s = angle.cos(), angle.sin()
    rotated = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], -1)
    scores_ours = ours @ ours.transpose(1, 2)
    scores_theirs = rotated.flatten(2) @ rotated.flatten(2).transpose(1, 2)
    torch.testing.assert_close(scores_ours, scores_theirs, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Refusals and bad input


def test_what_llama_cpp_cannot_run_is_refused_in_one_line(tokenizer, tmp_path):
    cases = {
        "sliding window": (dict(sliding_window=8), "sliding_window=8"),
        "rms+learned": (dict(position="learned"), "norm=rms, position=learned"),
        "gpt2 head size": (dict(**GPT2_STYLE, n_kv_head=0, head_size=32), "heads × head size"),
        "gpt2 sliding window": (dict(**GPT2_STYLE, n_kv_head=0, sliding_window=8), "no sliding-window"),
    }
    for name, (overrides, message) in cases.items():
        cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_head=4, n_layer=1, block_size=32)
        for key, value in overrides.items():
            setattr(cfg, key, value)
        with pytest.raises(LmkilnError, match=message) as err:
            export_gguf(Transformer(cfg), tokenizer, tmp_path / "x.gguf")
        assert "\n" not in str(err.value), name
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    words = Tokenizer(HFTokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, "a")), bos_token=None)
    model = Transformer(ModelConfig(vocab_size=2, d_model=32, n_head=2, n_layer=1, block_size=16))
    with pytest.raises(LmkilnError, match="WordLevel tokenizer"):
        export_gguf(model, words, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_cli_bad_input_is_one_line_and_leaves_nothing(llama, tokenizer, tmp_path, capsys):
    run = save_run(tmp_path / "run", llama, tokenizer)
    out = tmp_path / "m.gguf"

    def error(*args: str) -> str:
        assert cli.main(["export", *args]) == 2
        message = capsys.readouterr().err.strip()
        assert message.startswith("error:") and "\n" not in message
        return message

    assert "unknown GGUF dtype 'q4_0'" in error(str(run), "--to", "gguf", str(out), "--dtype", "q4_0")
    out.write_bytes(b"keep me")
    assert "pass --force" in error(str(run), "--to", "gguf", str(out))
    assert out.read_bytes() == b"keep me"
    assert cli.main(["export", str(run), "--to", "gguf", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    bare = tmp_path / "bare"
    (bare / "checkpoints").mkdir(parents=True)
    (run / "checkpoints").rename(bare / "checkpoints")
    assert "no tokenizer" in error(str(bare), "--to", "gguf", str(tmp_path / "n.gguf"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "m.gguf", "run"]


def test_a_full_disk_leaves_nothing_under_the_final_name(llama, tokenizer, tmp_path, monkeypatch):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True
    )
    try:
        if mounted.returncode != 0:  # not root: fail the write the way a full disk does
            original = gguf.GGUFWriter.write_tensors_to_file

            def full(self, **kwargs):
                original(self, **kwargs)
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
        with pytest.raises(LmkilnError, match="could not write .*m.gguf") as err:
            export_gguf(llama, tokenizer, small / "m.gguf")  # ~0.5 MB
        assert "MB free there); nothing was left under that name" in str(err.value)
        assert list(small.iterdir()) == []
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(small)], check=True)


# --------------------------------------------------------------------------------------------
# Parity with llama.cpp


def parity(model: Transformer, tokenizer: Tokenizer, path: Path, dtype: str):
    found = verify_gguf(
        model, tokenizer, path, dtype, stream_text=held_out(tokenizer), chat=chat("bird"), threads=2
    )
    print(f"\n{path.name} {dtype}: " + "; ".join(found.lines()))
    return found


@needs_llama_cpp
@pytest.mark.parametrize(
    "arch", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)]
)  # gpt2: trains a model
def test_llama_cpp_reproduces_lmkiln_in_f32_f16_and_q8_0(arch, request, tokenizer, tmp_path):
    model = request.getfixturevalue(arch)
    for dtype in ("f32", "f16", "q8_0"):
        path = tmp_path / f"{arch}-{dtype}.gguf"
        assert export_gguf(model, tokenizer, path, dtype=dtype).architecture == arch
        found = parity(model, tokenizer, path, dtype)
        assert found.tokens_equal, found.problems
        assert found.top1_agreement >= THRESHOLDS[dtype].top1
        assert found.perplexity_gap <= THRESHOLDS[dtype].perplexity
        if dtype == "f32":
            assert found.greedy_equal == found.greedy_total and found.greedy_tokens >= 16
            # ggml computes GELU through an fp16 lookup table: the gpt2 graph is off by ~1e-3
            assert found.max_abs_logits_diff < (1e-4 if arch == "llama" else 5e-3)
            assert found.chat.stopped and found.chat.reply == found.chat.expected
            assert found.chat.reply.startswith("The bird is ")  # it answers, then ends the turn
        assert found.ok, found.problems


@needs_llama_cpp
def test_llama_cpp_tokenizes_mixed_text_as_lmkiln_does(llama, tokenizer, tmp_path):
    path = tmp_path / "m.gguf"
    export_gguf(llama, tokenizer, path)
    llm = open_gguf(path, 128, threads=1)
    texts = [
        MIXED_TEXT,
        "  leading spaces",
        "trailing  \n\n",
        "<|im_start|>",
        "ÀÉÎ 漢字 🙂🙂 a\u00a0b \r\n x",
    ]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
        assert llm.detokenize(tokenizer.encode(text)).decode() == text
    assert len(tokenizer.encode(MIXED_TEXT)) > 60  # multi-byte merges, not just single bytes


@needs_llama_cpp
def test_a_character_model_runs_in_llama_cpp_with_its_ids_and_logits(tmp_path):
    """lmkiln's character tokenizer becomes llama.cpp's SentencePiece-style one: same ids, same text."""
    chars = train_char(iter(["hello world, the cat sat on the mat.\n" * 4, "café 日本"]))
    cfg = ModelConfig(vocab_size=chars.vocab_size, d_model=64, n_head=4, n_layer=2, block_size=128)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    path = tmp_path / "char.gguf"
    assert export_gguf(model, chars, path).tokenizer == "llama"
    llm = open_gguf(path, 128, threads=2)
    for text in [MIXED_TEXT, "hello world", "  two  spaces ", "unseen: Ω 🙂"]:
        ids = chars.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert llm.detokenize(ids).decode() == text
    ids = chars.encode("the cat sat on the mat")
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    assert (ours - torch.tensor(llm.scores[: len(ids)])).abs().max() < 1e-3


@needs_llama_cpp
def test_model_variants_llama_cpp_runs_with_equal_logits(tokenizer, tmp_path):
    """Biases, qkv bias, untied head, GQA, RoPE scaling, GPT-2 without biases: random weights."""
    variants = {
        "llama-biases-untied": dict(bias=True, tie_embeddings=False, n_kv_head=0),
        "qwen2-qkv-bias": dict(qkv_bias=True),
        "llama3-rope": dict(rope_scaling="llama3", rope_factor=8.0, rope_original_context=32, rope_base=5e5),
        "linear-rope": dict(rope_scaling="linear", rope_factor=2.0),
        "gpt2-gqa-no-bias-untied": dict(GPT2_STYLE, bias=False, n_kv_head=2, tie_embeddings=False),
        "gpt2-qkv-bias-only": dict(GPT2_STYLE, bias=False, qkv_bias=True, n_kv_head=0),
    }
    ids = torch.randint(0, tokenizer.vocab_size, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    for name, overrides in variants.items():
        torch.manual_seed(1)
        cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_head=4, n_kv_head=2, n_layer=2)
        cfg.block_size = 128
        for key, value in overrides.items():
            setattr(cfg, key, value)
        model = Transformer(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape) * 0.05)  # norms ≠ 1, biases ≠ 0
            ours = model(torch.tensor([ids]))[0]
        path = tmp_path / f"{name}.gguf"
        export_gguf(model, tokenizer, path)
        llm = open_gguf(path, 128, threads=2)
        llm.eval(ids)
        theirs = torch.tensor(llm.scores[: len(ids)])
        diff = (ours - theirs).abs().max().item()
        assert diff < 1e-3, (name, diff)


@needs_llama_cpp
@pytest.mark.slow
def test_lora_chat_run_and_hf_model_export_and_verify_from_the_cli(llama, tokenizer, tmp_path):
    """A LoRA chat fine-tune (merged on export) and a Hugging Face directory, through `lmkiln export`."""
    from finetune_helpers import ft_config, write_jsonl

    from lmkiln.interop.hf_export import export_model
    from lmkiln.tasks.finetune import finetune

    base = save_run(tmp_path / "base", llama, tokenizer)
    rows = [
        {"messages": [*chat(n), {"role": "assistant", "content": f"The {n} is {c}."}]}
        for n, c in COLOR.items()
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows * 4)
    lora = ("finetune.format=chat", "finetune.method=lora", "finetune.lora_r=4", "train.batch_size=4")
    finetune(ft_config(base, data, tmp_path / "lora", *lora))
    out = tmp_path / "lora.gguf"
    code = cli.main(["export", str(tmp_path / "lora"), "--to", "gguf", str(out), "--verify"])
    assert code == 0 and out.is_file()
    hf_dir = tmp_path / "hf"
    export_model(llama, tokenizer, hf_dir)
    report = export_gguf_from(hf_dir, tmp_path / "hf.gguf", dtype="f32")
    assert report.architecture == "llama" and "LlamaForCausalLM" in report.source
    found = parity(llama, tokenizer, tmp_path / "hf.gguf", "f32")
    assert found.ok, found.problems
