from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm import tokenizer as toklib

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
