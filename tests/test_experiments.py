"""`tinylm experiment bottleneck` and `tinylm experiment translation` on tiny settings."""

import json

import torch

from tinylm.cli import main
from tinylm.experiments.bottleneck import BottleneckConfig, CopyTask, buckets
from tinylm.tokenizer import train_char


def test_copy_and_reverse_targets_frame_the_source():
    tok = train_char("abc")
    for task in ("copy", "reverse"):
        data = CopyTask(BottleneckConfig(task=task, symbols="abc"), tok).pairs(
            [5], torch.Generator().manual_seed(3))
        src, tgt = data.src[0], data.tgt[0]
        assert src[-1] == tok.eos_id and tgt[0] == tok.bos_id and tgt[-1] == tok.eos_id
        body = tok.decode(src[:-1])
        assert tok.decode(tgt[1:-1]) == (body if task == "copy" else body[::-1])
        assert len(body) == 5 and set(body) <= set("abc")


def test_buckets_average_consecutive_lengths():
    assert buckets({4: 1.0, 5: 0.5, 6: 0.0, 7: 0.5, 8: 1.0}, 2) == [
        ("4-5", 0.75), ("6-7", 0.25), ("8", 1.0)]


def test_bottleneck_cli_trains_three_models_and_plots(tmp_path, capsys):
    out = tmp_path / "bn"
    sets = ["train.steps=3", "train.batch_size=4", "train.progress=false",
            "train.dtype=float32", "max_len=6", "eval_per_length=2", "rnn.d_model=16",
            "transformer.d_model=16", "transformer.n_head=2", "transformer.n_layer=1"]
    assert main(["experiment", "bottleneck", "--out", str(out)]
                + [a for s in sets for a in ("--set", s)]) == 0
    printed = capsys.readouterr().out
    assert "length" in printed and "rnn-attn" in printed and "transformer" in printed
    assert (out / "bottleneck.png").stat().st_size > 1000
    results = json.loads((out / "bottleneck.json").read_text())
    assert set(results) == {"rnn", "rnn-attn", "transformer"}
    assert set(results["rnn"]["accuracy"]) == {"2", "3", "4", "5", "6"}
    # every model's run dir can be used by the other tools (translate copies strings)
    assert main(["translate", "--run", str(out / "rnn-attn"), "--beam", "1", "abcd"]) == 0
    # a second run into the same folder refuses to overwrite
    assert main(["experiment", "bottleneck", "--out", str(out)]) == 2


def test_translation_table_cli(tmp_path, capsys):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"s{i}\tt{i}\n" for i in range(10)))
    shared = [f"data.pairs={tsv}", "train.steps=2", "train.batch_size=4",
              "train.progress=false", "train.dtype=float32", "train.eval_every=0",
              "decode.beam_size=2", "data.val_fraction=0.2", "rnn.d_model=16",
              "transformer.d_model=16", "transformer.n_head=2", "transformer.n_layer=1"]
    overrides = "overrides=[" + ", ".join(f'"{s}"' for s in shared) + "]"
    out = tmp_path / "tr"
    assert main(["experiment", "translation", "--out", str(out), "--set", overrides]) == 0
    table = (out / "translation.md").read_text()
    assert table.count("\n") == 5  # header, rule, three models
    for name in ("RNN, context vector", "RNN + attention", "Transformer"):
        assert name in table
    capsys.readouterr()
    assert main(["experiment", "translation", "--out", str(out), "--set", overrides]) == 0
    assert capsys.readouterr().out.count("reusing") == 3  # finished runs are read back
