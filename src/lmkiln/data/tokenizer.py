"""Tokenizers: train a byte-level BPE or a character vocabulary, or load any tokenizer.json.

Every tokenizer is a Hugging Face `tokenizers.Tokenizer` underneath, saved as the standard
`tokenizer.json` (plus a `tokenizer_config.json` so `transformers.AutoTokenizer` loads it). Raw
text is always encoded *ordinarily*: a special token written in the text (e.g. "<|endoftext|>")
stays plain text; only templates insert control tokens. Bulk encoding goes through a verified
fast path (see `fast_encode.py`) that must produce identical ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmkiln.data.fast_encode import VERIFY_CHARS, FastPathMismatch, FlatIds, build_fast_encoder, flatten
from lmkiln.errors import LmkilnError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
BOS = "<|bos|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
RESERVED = [f"<|reserved_{i}|>" for i in range(4)]
SPECIAL_TOKENS = [EOS, PAD, BOS, IM_START, IM_END, *RESERVED]
"""Special tokens of every tokenizer lmkiln trains; they get ids 0..8."""

# ChatML, the template stored with every trained tokenizer; rendered by jinja2 in transformers
# and by lmkiln.data.templates with the same result.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


class Tokenizer:
    """A `tokenizers.Tokenizer` with lmkiln's conventions: ordinary encoding, named special ids."""

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        chat_template: str | None = CHATML_TEMPLATE,
        eos_token: str = EOS,
        pad_token: str | None = PAD,
        bos_token: str | None = BOS,
        fast: bool = True,
    ) -> None:
        self.json = hf.to_str()
        self._ordinary = HFTokenizer.from_str(self.json)
        self._ordinary.encode_special_tokens = True  # "<|endoftext|>" in raw text is just text
        self._special = HFTokenizer.from_str(self.json)
        self._special.encode_special_tokens = False
        self.chat_template = chat_template
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
        self.eos_id = self._required_id(eos_token)
        self.pad_id = self.token_id(pad_token) if pad_token else None
        self.bos_id = self.token_id(bos_token) if bos_token else None
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.fingerprint = hashlib.sha256(self.json.encode()).hexdigest()
        self._fast = None
        if fast:
            self._fast = build_fast_encoder(self.json, self.encode_batch_reference)

    # -- ids -----------------------------------------------------------------------------------
    def token_id(self, token: str) -> int | None:
        return self._special.token_to_id(token)

    def _required_id(self, token: str) -> int:
        token_id = self.token_id(token)
        if token_id is None:
            raise LmkilnError(
                f"tokenizer has no {token!r} token; lmkiln needs an end-of-text token "
                f"(pass its name when loading, or train a tokenizer with lmkiln)"
            )
        return token_id

    @property
    def special_ids(self) -> set[int]:
        return {
            self._special.token_to_id(t.content)
            for t in self._special.get_added_tokens_decoder().values()
            if t.special
        }

    @property
    def fast_path(self) -> str:
        return self._fast.name if self._fast else "tokenizers"

    def disable_fast_path(self) -> None:
        self._fast = None

    # -- encode / decode -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of raw text; special-token strings inside it are encoded as ordinary text."""
        return self._ordinary.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ordinary encoding of many texts, through the fast path when one is available."""
        if self._fast is not None:
            return self._fast.encode_batch(texts)
        return self.encode_batch_reference(texts)

    def encode_flat(self, texts: list[str]) -> FlatIds:
        """`encode_batch` as one array of ids and one of lengths (no Python list per text)."""
        if self._fast is not None:
            return self._fast.encode_flat(texts)
        return flatten(self.encode_batch_reference(texts))

    def encode_batch_reference(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._ordinary.encode_batch(texts, add_special_tokens=False)]

    def encode_flat_verified(self, texts: list[str]) -> FlatIds:
        """`encode_flat`, with a slice of the batch re-encoded by the reference and compared.

        Raises FastPathMismatch (and turns the fast path off for this tokenizer) on any
        difference, so the caller can redo its work with the reference encoder.
        """
        ids, lengths = self.encode_flat(texts)
        if self._fast is None or not texts:
            return ids, lengths
        starts = np.cumsum(lengths) - lengths
        longest = max(range(len(texts)), key=lambda i: len(texts[i]))
        for index in {0, longest}:
            sample = texts[index][:VERIFY_CHARS]
            if len(texts[index]) <= VERIFY_CHARS:
                fast = ids[starts[index] : starts[index] + lengths[index]].tolist()
            else:
                fast = self.encode_batch([sample])[0]
            if fast != self.encode_batch_reference([sample])[0]:
                self.disable_fast_path()
                raise FastPathMismatch(
                    f"fast encoder disagreed with tokenizers on document {index} of a batch"
                )
        return ids, lengths

    def encode_template(self, text: str) -> list[int]:
        """Ids of template-rendered text, where special-token strings become control tokens."""
        return self._special.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._special.decode(list(ids), skip_special_tokens=skip_special)

    # -- files ---------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and a tokenizer_config.json that transformers understands."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text(self.json, encoding="utf-8")
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "bos_token": self.bos_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, path: str | Path, fast: bool = True) -> Tokenizer:
        """Load tokenizer.json (a file, or a directory holding it and maybe tokenizer_config.json)."""
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise LmkilnError(
                f"no tokenizer.json at {path}; give a tokenizer.json file or a directory holding one"
            )
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise LmkilnError(f"{file}: not a valid tokenizer.json ({err})") from None
        config = _read_tokenizer_config(directory)
        eos = _token_name(config.get("eos_token")) or _guess_eos(hf)
        return cls(
            hf,
            chat_template=_chat_template(directory, config),
            eos_token=eos,
            pad_token=_token_name(config.get("pad_token")) or _existing(hf, PAD),
            bos_token=_token_name(config.get("bos_token")) or _existing(hf, BOS),
            fast=fast,
        )


def _read_tokenizer_config(directory: Path) -> dict:
    file = directory / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LmkilnError(f"{file}: not a valid JSON file ({err})") from None
    if not isinstance(config, dict):
        raise LmkilnError(f"{file}: expected a JSON object")
    return config


def _chat_template(directory: Path, config: dict) -> str | None:
    jinja = directory / "chat_template.jinja"  # transformers 5 writes the template beside the config
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LmkilnError(f"{jinja}: not a UTF-8 text file") from None
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def _token_name(value: object) -> str | None:
    if isinstance(value, dict):  # older transformers saved AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) else None


def _existing(hf: HFTokenizer, token: str) -> str | None:
    return token if hf.token_to_id(token) is not None else None


def _guess_eos(hf: HFTokenizer) -> str:
    for token in (EOS, "</s>", "<|end_of_text|>", "<|eot_id|>", "[SEP]", "<eos>"):
        if hf.token_to_id(token) is not None:
            return token
    return EOS  # Tokenizer() raises the clear error


def _add_special_tokens(hf: HFTokenizer) -> None:
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int = 2, fast: bool = True) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenization, all 256 bytes in the alphabet)."""
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise LmkilnError(
            f"tokenizer.vocab_size {vocab_size} is smaller than the byte alphabet (256) plus "
            f"{len(SPECIAL_TOKENS)} special tokens; use at least {minimum}"
        )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split + byte map
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    _add_special_tokens(hf)
    return Tokenizer(hf, fast=fast)


def train_char(texts: Iterator[str], fast: bool = True) -> Tokenizer:
    """A character vocabulary (every character seen) with byte fallback, so any text round-trips."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in sorted(chars):
        vocab.setdefault(char, len(vocab))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    _add_special_tokens(hf)
    return Tokenizer(hf, fast=fast)


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
    """Compression on held-out text: UTF-8 bytes divided by tokens (higher is better)."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return n_bytes / max(n_tokens, 1)
