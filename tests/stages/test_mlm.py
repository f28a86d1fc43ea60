import pytest
import torch
from safetensors.torch import load_file

from tinylm import rundir
from tinylm.cli import main
from tinylm.data.mlm import Masker
from tinylm.eval.mlm import mlm_metrics
from tinylm.models.gpt import GPT, GPTConfig
from tinylm.tokenizer import train_bpe

SENTENCES = [
    "The dog is chasing the ball.", "The cat is sleeping on the bed.",
    "A boy is playing in the park.", "The girl is eating a red apple.",
    "The bird is singing in the tree.", "Mom is baking a big cake.",
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("\n\n".join(SENTENCES * 40))
    return path


def tiny_args(corpus, out, steps: int = 12, *more: str) -> list[str]:
    """The shipped preset shrunk to seconds: small BPE vocab, 1 layer of width 32."""
    sets = [*more, f"data.corpus={corpus}", "data.vocab_size=300", "model.block_size=16",
            "model.n_layer=1", "model.n_head=2", "model.d_model=32", f"train.steps={steps}",
            "train.batch_size=8", "train.warmup_steps=2", "train.eval_every=0",
            "train.progress=false", "train.dtype=float32"]
    return ["mlm", "--config", "mlm-tinystories", "--out", str(out)] + [
        a for s in sets for a in ("--set", s)]


def test_mlm_trains_then_fill_mask_ranks_candidates_for_each_mask(corpus, tmp_path, capsys):
    run = tmp_path / "bert"
    assert main(tiny_args(corpus, run)) == 0
    out = capsys.readouterr().out
    assert "held-out masked tokens: accuracy" in out and "perplexity" in out
    assert (run / "model.safetensors").is_file() and (run / "tokenizer.json").is_file()

    assert main(["fill-mask", "--run", str(run), "-k", "3",
                 "The [MASK] is chasing the [MASK]."]) == 0
    out = capsys.readouterr().out
    assert "[MASK] 1 of 2" in out and "[MASK] 2 of 2" in out
    assert out.count("%") == 6  # 3 candidates with a probability for each of 2 masks
    assert "best: The" in out


def test_resume_replays_the_same_batches_and_masks(corpus, tmp_path):
    # A constant LR after warmup, so stopping at step 4 of 8 changes no LR along the way.
    straight, halted = tmp_path / "straight", tmp_path / "halted"
    assert main(tiny_args(corpus, straight, 8, "train.schedule=constant")) == 0
    assert main(tiny_args(corpus, halted, 4, "train.schedule=constant")) == 0
    assert main(tiny_args(corpus, halted, 8) + ["--resume"]) == 0
    a, b = load_file(straight / "model.safetensors"), load_file(halted / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_held_out_eval_scores_the_same_masks_every_time(corpus, tmp_path):
    run = tmp_path / "bert"
    assert main(tiny_args(corpus, run, steps=2)) == 0
    model = rundir.load_model(run, family="bert").eval()
    tok = train_bpe(corpus.read_text(), 300)
    windows = [torch.tensor([tok.encode(s)[:8]]) for s in SENTENCES]
    first = mlm_metrics(model, windows, Masker(tok), seed=5)
    again = mlm_metrics(model, windows, Masker(tok), seed=5)
    assert first == again
    assert 0 <= first["val_acc"] <= 1 and first["val_ppl"] > 1


def test_fill_mask_without_mask_is_a_one_line_error(corpus, tmp_path, capsys):
    run = tmp_path / "bert"
    assert main(tiny_args(corpus, run, steps=1)) == 0
    capsys.readouterr()
    assert main(["fill-mask", "--run", str(run), "The dog is chasing the ball."]) == 2
    err = capsys.readouterr().err
    assert "no [MASK]" in err and len(err.strip().splitlines()) == 1


def test_fill_mask_on_a_gpt_run_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "gpt"
    rundir.save_model(run, GPT(GPTConfig(vocab_size=300, n_layer=1, n_head=2, d_model=32)))
    train_bpe(" ".join(SENTENCES), 300).save(run / "tokenizer.json")
    assert main(["fill-mask", "--run", str(run), "The [MASK] is red."]) == 2
    err = capsys.readouterr().err
    assert "gpt" in err and "tinylm mlm" in err and len(err.strip().splitlines()) == 1
