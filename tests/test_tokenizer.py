import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm import tokenizer as toklib
from tinylm.errors import UserError
from tinylm.tokenizer import BOS, Tokenizer, train_char

CORPUS = "To be, or not to be, that is the question.\n" * 50
CHAR = toklib.train_char(CORPUS)
BPE = toklib.train_bpe(CORPUS * 4, vocab_size=300)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_char_round_trip_any_unicode(text):
    assert CHAR.decode(CHAR.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trip_any_unicode(text):
    assert BPE.decode(BPE.encode(text)) == text


def test_char_vocab_is_one_token_per_seen_character():
    ids = CHAR.encode("to be")
    assert len(ids) == 5
    assert CHAR.decode(ids[:1]) == "t"


def test_unseen_characters_fall_back_to_bytes():
    ids = CHAR.encode("é")  # not in the corpus: two UTF-8 byte tokens
    assert len(ids) == 2 and CHAR.decode(ids) == "é"


def test_special_tokens_are_reserved_in_both_kinds():
    for tok in (CHAR, BPE):
        for special in toklib.SPECIAL_TOKENS:
            assert tok.special_id(special) is not None
        assert tok.encode(toklib.MASK) == [tok.mask_id]


def test_bpe_learns_words():
    assert len(BPE.encode(" question")) < len(" question")


def test_save_load_identical(tmp_path):
    BPE.save(tmp_path / "tokenizer.json")
    again = toklib.Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode(CORPUS) == BPE.encode(CORPUS)
    assert again.kind == "bpe" and CHAR.kind == "char"


def test_a_tokenizer_with_its_own_special_tokens_keeps_them_through_save_and_load(tmp_path):
    """An imported tokenizer (ChatML's tokens, no tinylm ones) names which token plays each
    role; the roles travel in tokenizer.roles.json and nothing is renamed or added."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from tinylm.tokenizer import roles_path

    hf = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate("abc ")}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    hf.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    roles = {"pad": "<|im_end|>", "bos": "<|im_start|>", "eos": "<|im_end|>"}
    tok = Tokenizer(hf, roles)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (5, 6, 6, None)
    assert tok.vocab_size == 7 and tok.special_id(BOS) is None
    tok.save(tmp_path / "tokenizer.json")
    assert roles_path(tmp_path / "tokenizer.json").is_file()
    back = Tokenizer.load(tmp_path / "tokenizer.json")
    assert back.roles == roles and back.eos_id == 6 and back.fingerprint() == tok.fingerprint()
    assert back.encode("ab<|im_end|>") == [0, 1, 6]
    train_char("abc").save(tmp_path / "tokenizer.json")  # a tinylm tokenizer in its place
    assert not roles_path(tmp_path / "tokenizer.json").exists()
    with pytest.raises(UserError, match="lacks special tokens"):
        Tokenizer(hf, {"pad": "<|pad|>", "bos": "<|im_start|>", "eos": "<|im_end|>"})
