"""The CLI end to end on a tiny run, and its one-line errors (exit 2, no traceback)."""

from __future__ import annotations

import pytest

from tinylm.cli import main


@pytest.fixture
def run_dir(tiny_corpus, tmp_path, tiny_overrides):
    out = tmp_path / "run"
    sets = [f"--set={o}" for o in tiny_overrides]
    assert main(["pretrain", "--out", str(out), f"--set=data.corpus='{tiny_corpus}'", *sets]) == 0
    return out


def test_pretrain_sample_next_word(run_dir, tmp_path, capsys):
    assert main(["sample", "--run", str(run_dir), "--prompt", "The", "--max-new-tokens", "5",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("The")
    for dtype in ("fp32", "int8"):  # the exact weights and the fastest kind both run
        assert main(["sample", "--run", str(run_dir), "--prompt", "The", "--max-new-tokens",
                     "3", "--temperature", "0", "--dtype", dtype]) == 0
        assert capsys.readouterr().out.startswith("The")
    png = tmp_path / "next.png"
    assert main(["next-word", "--run", str(run_dir), "The sun is", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "probability" in out and png.stat().st_size > 0


def test_unknown_key(capsys, error_of):
    assert "valid keys" in error_of(["pretrain", "--set", "model.widht=3"], capsys)


def test_wrong_type(capsys, error_of):
    assert "must be int" in error_of(["pretrain", "--set", "train.steps=1.5"], capsys)


def test_missing_corpus(tmp_path, capsys, error_of):
    err = error_of(["pretrain", "--out", str(tmp_path / "r"), "--set",
                    f"data.corpus='{tmp_path / 'nope.txt'}'"], capsys)
    assert "not found" in err


def test_empty_and_binary_corpus(tmp_path, capsys, error_of):
    for content, words in ((b"", "empty"), (b"\x80\x81abc", "not UTF-8")):
        path = tmp_path / "c.txt"
        path.write_bytes(content)
        args = ["pretrain", "--out", str(tmp_path / "r"), "--set", f"data.corpus='{path}'"]
        assert words in error_of(args, capsys)


def test_block_size_over_the_model_maximum(tmp_path, tiny_corpus, tiny_overrides, capsys,
                                           error_of):
    """A learned-position model cannot be fine-tuned past its position table."""
    gpt2 = tmp_path / "gpt2"
    sets = [f"--set={o}" for o in tiny_overrides] + ["--set=model.pos='learned'"]
    assert main(["pretrain", "--out", str(gpt2), f"--set=data.corpus='{tiny_corpus}'", *sets]) == 0
    args = ["pretrain", "--init", str(gpt2), "--out", str(tmp_path / "ft2"),
            f"--set=data.corpus='{tiny_corpus}'", "--set=model.block_size=64"]
    assert "learned positions" in error_of(args, capsys)


def test_missing_and_truncated_checkpoint(run_dir, tmp_path, capsys, error_of):
    assert "does not exist" in error_of(["sample", "--run", str(tmp_path / "nope")], capsys)
    weights = run_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "truncated" in error_of(["sample", "--run", str(run_dir)], capsys)


def test_wrong_family(run_dir, capsys, error_of):
    meta = run_dir / "model.json"
    meta.write_text(meta.read_text().replace('"gpt"', '"nonsense"'))
    assert "unknown model family" in error_of(["next-word", "--run", str(run_dir), "x"], capsys)


def test_bad_sampling_values(run_dir, capsys, error_of):
    assert "temperature" in error_of(["sample", "--run", str(run_dir), "--temperature", "-1"],
                                     capsys)
    assert "top_p" in error_of(["sample", "--run", str(run_dir), "--top-p", "0"], capsys)
    assert "unknown dtype 'fp8'" in error_of(["sample", "--run", str(run_dir), "--dtype", "fp8"],
                                             capsys)
