import numpy as np
import pytest
import torch

from tinylm.data.text import load_text
from tinylm.data.tokens import TokenData, cache_dir, encode_cached
from tinylm.errors import UserError
from tinylm.tokenizer import train_char


def test_cache_is_reused_and_identical(tiny_corpus):
    text = load_text(str(tiny_corpus))
    tok = train_char(text)
    first = np.array(encode_cached(text, tok))
    assert len(list(cache_dir().glob("*.bin"))) >= 1
    second = encode_cached(text, tok)
    assert isinstance(second, np.memmap)
    assert np.array_equal(first, second)
    assert tok.decode(first.tolist()) == text


def test_split_is_the_last_tenth():
    data = TokenData(np.arange(1000, dtype=np.uint16), 0.1)
    assert len(data.val) == 100 and data.val[0] == 900 and data.train[-1] == 899


def test_batches_are_shifted_windows_and_deterministic():
    data = TokenData(np.arange(1000, dtype=np.uint16), 0.1)
    x, y = data.batch(4, 16, torch.Generator().manual_seed(1))
    x2, _ = data.batch(4, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)
    assert torch.equal(x[:, 1:], y[:, :-1]) and (y - x == 1).all()
    assert x.max() < 900  # never reads validation tokens


def test_val_batches_cover_val_once():
    data = TokenData(np.arange(1000, dtype=np.uint16), 0.1)
    seen = torch.cat([x.flatten() for x, _ in data.val_batches(2, 9)])
    assert seen.unique().numel() == seen.numel() == 99


def test_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text('{"text": "world"}\n')
    assert load_text(str(tmp_path)) == "hello\n\nworld"
    assert "ROMEO" in load_text("tinyshakespeare")


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"\xff\xfe bad", "not UTF-8"), (b"   \n", "empty")],
)
def test_bad_corpora(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_text(str(path))


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        load_text(str(path))
