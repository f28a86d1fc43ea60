"""`tinylm seq2seq` and `tinylm translate`: training, scoring, decoding, one-line errors."""

import json

import pytest

from tinylm import rundir
from tinylm.cli import main
from tinylm.infer.beam import translate
from tinylm.models.gpt import GPT, GPTConfig
from tinylm.rundir import load_seq2seq
from tinylm.stages import seq2seq
from tinylm.stages.common import load_stage_config
from tinylm.stages.seq2seq import Seq2SeqConfig
from tinylm.tokenizer import train_char

PAIRS = [("I am cold.", "J'ai froid."), ("Go.", "Va !"), ("Hi.", "Salut."),
         ("I won.", "J'ai gagné."), ("Thanks.", "Merci."), ("Run!", "Cours !"),
         ("Stop!", "Arrête !"), ("Wait!", "Attends !")]


@pytest.fixture
def tsv(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{s}\t{t}\tattribution\n" for s, t in PAIRS), encoding="utf-8")
    return path


def tiny_sets(tsv, steps: int, family: str = "transformer") -> list[str]:
    model = ([f"transformer.{k}" for k in ("d_model=32", "n_head=2", "n_layer=1",
                                           "dropout=0.0", "block_size=24")]
             if family == "transformer" else
             [f"rnn.{k}" for k in ("d_model=48", "dropout=0.0", "attention=true",
                                   "block_size=24")])
    return [f"data.pairs={tsv}", f"train.steps={steps}", "train.batch_size=8",
            "train.warmup_steps=5", "train.progress=false", "train.dtype=float32",
            "train.eval_every=0", "decode.beam_size=2", "decode.samples=2", *model]


@pytest.mark.parametrize("family, steps", [("transformer", 150), ("rnn", 150)])
def test_a_tiny_model_overfits_a_few_pairs(tsv, tmp_path, family, steps):
    preset = "seq2seq-transformer" if family == "transformer" else "seq2seq-rnn-attn"
    sets = tiny_sets(tsv, steps, family) + ["data.val_fraction=0", "train.lr=1e-2"]
    cfg = load_stage_config(Seq2SeqConfig, preset, sets, str(tmp_path / "run"), False)
    result = seq2seq.run(cfg)
    assert result["loss"] < 0.05
    model, src_tok, tgt_tok = load_seq2seq(tmp_path / "run")
    sources, targets = zip(*PAIRS)
    assert translate(model, src_tok, tgt_tok, sources, beam_size=1) == list(targets)
    assert translate(model, src_tok, tgt_tok, sources, beam_size=3) == list(targets)


def test_cli_trains_scores_and_translates(tsv, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["seq2seq", "--config", "seq2seq-rnn", "--out", str(run)]
    sets = tiny_sets(tsv, 4, "rnn") + ["rnn.attention=false", "data.val_fraction=0.25"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert "held-out greedy: BLEU" in out and "held-out beam: BLEU" in out
    scores = json.loads((run / "translation.json").read_text())
    assert scores["sources"] == 2 and {"bleu", "chrf", "exact"} <= set(scores["beam"])
    assert main(["translate", "--run", str(run), "--beam", "2", "I am cold.", "Go."]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_separate_vocabularies_write_a_target_tokenizer(tsv, tmp_path, capsys):
    run = tmp_path / "run"
    sets = tiny_sets(tsv, 2) + ["data.shared_vocab=false", "data.val_fraction=0"]
    assert main(["seq2seq", "--out", str(run)] + [a for s in sets for a in ("--set", s)]) == 0
    assert (run / "tokenizer-target.json").is_file()
    model, src_tok, tgt_tok = load_seq2seq(run)
    assert model.config.tgt_vocab_size == tgt_tok.vocab_size != 0
    assert main(["translate", "--run", str(run), "--beam", "1", "Hi."]) == 0


def test_malformed_tsv_names_the_line_or_is_skipped(tsv, tmp_path, capsys, error_of):
    bad = tmp_path / "bad.tsv"
    bad.write_text(tsv.read_text() + "no tab on this line\n")
    sets = [f"--set={s}" for s in tiny_sets(bad, 2)]
    err = error_of(["seq2seq", "--out", str(tmp_path / "a"), *sets], capsys)
    assert f"bad.tsv:{len(PAIRS) + 1}: no tab" in err and "on_error" in err
    assert main(["seq2seq", "--out", str(tmp_path / "b"), *sets,
                 "--set", "data.on_error=skip"]) == 0
    assert "skipped 1 malformed lines" in capsys.readouterr().out


def test_translate_refuses_a_gpt_run_and_an_empty_source(tsv, tmp_path, capsys, error_of):
    gpt_run = tmp_path / "gpt"
    tok = train_char("abc")
    rundir.save_model(gpt_run, GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1,
                                                 n_head=2, d_model=16, block_size=8)))
    tok.save(gpt_run / "tokenizer.json")
    err = error_of(["translate", "--run", str(gpt_run), "I am cold."], capsys)
    assert "gpt" in err and "tinylm seq2seq" in err

    run = tmp_path / "run"
    sets = tiny_sets(tsv, 2) + ["data.val_fraction=0"]
    assert main(["seq2seq", "--out", str(run)] + [a for s in sets for a in ("--set", s)]) == 0
    capsys.readouterr()
    assert "empty" in error_of(["translate", "--run", str(run), "  "], capsys)
    assert "does not exist" in error_of(["translate", "--run", str(tmp_path / "nope"), "Hi."],
                                        capsys)
