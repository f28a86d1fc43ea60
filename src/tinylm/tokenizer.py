"""Tokenizers trained on the user's own text, stored in the HF `tokenizers` format.

Two kinds, both lossless on any Unicode text:
- `char`: one token per character seen in the corpus, plus 256 byte tokens as a fallback for
  characters it never saw (the Llama trick), so nothing is ever mapped to "unknown".
- `bpe`: byte-level BPE (GPT-2 style) learned from the corpus with `vocab_size` entries.

Both reserve the same special tokens, so later stages (masked LM, chat) find them in any run.

An imported tokenizer (a Hugging Face or GGUF checkpoint's) keeps its own vocabulary and special
tokens: `roles` says which of its tokens plays padding, begin and end of text (SmolLM2:
<|im_start|>, <|im_end|>), and is saved beside the tokenizer file (`tokenizer.roles.json`),
since the tokenizers format has no place for it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tinylm.errors import UserError
from tinylm.files import atomic_write_text

BOS, EOS, PAD, MASK = "<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, MASK, SYSTEM, USER, ASSISTANT, END]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
TINYLM_ROLES = {"pad": PAD, "bos": BOS, "eos": EOS, "mask": MASK}


def roles_path(path: Path) -> Path:
    """Where a tokenizer file's roles are kept: tokenizer.json -> tokenizer.roles.json."""
    return Path(path).with_suffix(".roles.json")


class Tokenizer:
    """A thin, typed wrapper over `tokenizers.Tokenizer` with the ids of its special roles.

    `roles` maps 'pad', 'bos', 'eos' (and 'mask', optional) to the token that plays each;
    None = tinylm's own tokens, which a tokenizer tinylm trained always has (with the chat
    role tokens). `mask_id` is None for a tokenizer without a mask token."""

    def __init__(self, hf: HFTokenizer, roles: dict[str, str] | None = None):
        self.hf = hf
        self.roles = dict(roles) if roles is not None else dict(TINYLM_ROLES)
        wanted = SPECIAL_TOKENS if roles is None else list(self.roles.values())
        missing = [t for t in wanted if hf.token_to_id(t) is None]
        if missing:
            raise UserError(f"tokenizer lacks special tokens {missing}; retrain it with tinylm")
        if any(r not in self.roles for r in ("pad", "bos", "eos")):
            raise UserError(f"tokenizer roles {self.roles} must name pad, bos and eos")
        self.pad_id, self.bos_id, self.eos_id = (
            hf.token_to_id(self.roles[r]) for r in ("pad", "bos", "eos"))
        self.mask_id = hf.token_to_id(self.roles["mask"]) if "mask" in self.roles else None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def kind(self) -> str:
        return "bpe" if isinstance(self.hf.pre_tokenizer, pre_tokenizers.ByteLevel) else "char"

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str:
        return self.hf.id_to_token(i)

    def special_id(self, token: str) -> int:
        return self.hf.token_to_id(token)

    def to_str(self) -> str:
        return self.hf.to_str()

    def fingerprint(self) -> str:
        roles = "" if self.roles == TINYLM_ROLES else json.dumps(self.roles, sort_keys=True)
        return hashlib.sha256((self.to_str() + roles).encode()).hexdigest()[:16]

    def save(self, path: Path) -> None:
        """The tokenizer file, and its roles file when the roles are not tinylm's own."""
        side = roles_path(path)
        if self.roles != TINYLM_ROLES:
            atomic_write_text(side, json.dumps(self.roles, indent=2))
        elif side.is_file():
            side.unlink()  # an older tokenizer's roles must not attach to this one
        atomic_write_text(path, self.to_str())

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        if not Path(path).is_file():
            raise UserError(f"{path}: no tokenizer file; is this a tinylm run dir?")
        roles = None
        if roles_path(path).is_file():
            try:
                roles = json.loads(roles_path(path).read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"{roles_path(path)} is not valid JSON ({e})") from None
        try:
            hf = HFTokenizer.from_str(Path(path).read_text(encoding="utf-8"))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise UserError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls(hf, roles)


def train_char(text: str) -> Tokenizer:
    """Character vocabulary of `text` (sorted, so ids are stable), with byte fallback."""
    chars = sorted(set(text) - set(SPECIAL_TOKENS))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + chars)}
    for b in BYTE_TOKENS:
        vocab.setdefault(b, len(vocab))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, ignore_merges=True))
    # Split into single characters so a 1 MB corpus is not one giant "word".
    hf.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens(SPECIAL_TOKENS)
    return Tokenizer(hf)


def train_bpe(text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE learned on `text`; `vocab_size` counts bytes, merges and special tokens."""
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise UserError(f"data.vocab_size={vocab_size} is too small for BPE; use more than {floor}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(_chunks(text), trainer=trainer)
    return Tokenizer(hf)


def train(text: str, kind: str, vocab_size: int = 0) -> Tokenizer:
    if kind == "char":
        return train_char(text)
    if kind == "bpe":
        return train_bpe(text, vocab_size)
    raise UserError(f"unknown tokenizer {kind!r}; use 'char' or 'bpe'")


def _chunks(text: str, size: int = 1 << 16):
    for i in range(0, len(text), size):
        yield text[i : i + size]


def describe(tok: Tokenizer) -> str:
    return json.dumps({"kind": tok.kind, "vocab_size": tok.vocab_size})
