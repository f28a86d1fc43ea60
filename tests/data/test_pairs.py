"""Sentence pairs: TSV reading with line-numbered errors, a leak-free split, batching."""

import pytest

from tinylm.data.pairs import (
    PairData,
    encode_source,
    read_pairs,
    references,
    split_pairs,
)
from tinylm.errors import UserError
from tinylm.tokenizer import train_char


def write(tmp_path, text: str):
    path = tmp_path / "pairs.tsv"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_reads_the_first_two_columns_and_skips_blank_lines(tmp_path):
    path = write(tmp_path, "Hi.\tSalut.\tCC-BY attribution\n\nGo.\tVa !\n")
    pairs = read_pairs(path).pairs
    assert [(p.src, p.tgt, p.line) for p in pairs] == [("Hi.", "Salut.", 1), ("Go.", "Va !", 3)]


@pytest.mark.parametrize("line, problem", [("no tab here", "no tab"),
                                           ("\tSalut.", "empty source"),
                                           ("Hi.\t  ", "empty target")])
def test_a_malformed_line_stops_with_its_line_number(tmp_path, line, problem):
    path = write(tmp_path, f"Hi.\tSalut.\n{line}\nGo.\tVa !\n")
    with pytest.raises(UserError, match=rf"pairs.tsv:2: {problem}.*on_error"):
        read_pairs(path)


def test_on_error_skip_keeps_the_good_lines_and_names_the_bad_ones(tmp_path):
    path = write(tmp_path, "Hi.\tSalut.\nbroken\nGo.\tVa !\n\tOui.\n")
    result = read_pairs(path, on_error="skip")
    assert [p.src for p in result.pairs] == ["Hi.", "Go."]
    assert [s.split(": ", 1)[0].rsplit(":", 1)[1] for s in result.skipped] == ["2", "4"]


def test_the_shipped_pairs_load_by_name():
    pairs = read_pairs("eng-fra").pairs
    assert len(pairs) == 5000 and pairs[0].src == "Go."


def test_split_is_deterministic_and_holds_out_whole_sources():
    pairs = read_pairs("eng-fra").pairs
    train, held = split_pairs(pairs, 0.1, seed=0)
    again = split_pairs(pairs, 0.1, seed=0)
    assert (train, held) == again
    assert len(train) + len(held) == len(pairs)
    assert not {p.src for p in train} & {p.src for p in held}  # no source on both sides
    sources, refs = references(held)
    assert len(sources) == round(len({p.src for p in pairs}) * 0.1)
    assert sum(map(len, refs)) == len(held) and max(map(len, refs)) > 1  # multi-reference
    assert split_pairs(pairs, 0.1, seed=1)[1] != held


def test_empty_source_is_a_user_error():
    tok = train_char("abc")
    with pytest.raises(UserError, match="empty"):
        encode_source(tok, "   ")


def test_batches_are_padded_with_targets_shifted_and_masked():
    tok = train_char("abc")
    data = PairData([[8, 9, tok.eos_id], [8, tok.eos_id]],
                    [[tok.bos_id, 10, tok.eos_id], [tok.bos_id, 10, 11, tok.eos_id]], tok.pad_id)
    src, tgt_in, tgt_out = data.collate([0, 1])
    assert src.tolist() == [[8, 9, tok.eos_id], [8, tok.eos_id, tok.pad_id]]
    assert tgt_in.tolist() == [[tok.bos_id, 10, tok.pad_id], [tok.bos_id, 10, 11]]
    assert tgt_out.tolist() == [[10, tok.eos_id, -100], [10, 11, tok.eos_id]]
