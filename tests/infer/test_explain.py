"""Explain tools: the next-word table and the per-token probabilities of `sample --explain`."""

from __future__ import annotations

import re

import pytest
import torch

from tinylm.cli import main
from tinylm.infer.engine import Engine, SamplingParams
from tinylm.infer.explain import explain_sample, format_table, next_token_table
from tinylm.models.gpt import GPT, gpt2_style
from tinylm.rundir import save_model
from tinylm.tokenizer import train_char

TEXT = "the cat sat on the mat. the dog sat on the log.\n" * 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tok = train_char(TEXT)
    torch.manual_seed(0)
    model = GPT(gpt2_style(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2,
                           d_model=32)).eval()
    path = tmp_path_factory.mktemp("run")
    save_model(path, model)
    tok.save(path / "tokenizer.json")
    return path, model, tok


def test_next_token_table_lists_the_most_likely_tokens_in_order(run):
    _, model, tok = run
    rows = next_token_table(model, tok, "the cat", k=5)
    probs = [p for _, p in rows]
    assert len(rows) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1
    with torch.no_grad():
        best = model(torch.tensor([tok.encode("the cat")]))[0, -1].softmax(-1).max().item()
    assert probs[0] == pytest.approx(best)
    assert "rank" in format_table(rows)


def test_explain_shows_each_tokens_probability_and_runners_up(run):
    _, model, tok = run
    engine = Engine(model, tok)
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    completion, table = explain_sample(engine, "the cat", params, k=3)
    lines = table.splitlines()[2:]
    assert len(lines) == len(completion.token_ids) == 6
    with torch.no_grad():
        first = model(torch.tensor([tok.encode("the cat")]))[0, -1].softmax(-1)
    top = first.topk(4)
    shown = [float(x) / 100 for x in re.findall(r"(\d+\.\d)%", lines[0])]
    assert shown[0] == pytest.approx(top.values[0].item(), abs=1e-3)  # greedy: the best token
    assert shown[1:] == pytest.approx(top.values[1:].tolist(), abs=1e-3)  # runners-up


def test_cli_sample_explain_and_next_word(run, capsys):
    path, _, _ = run
    assert main(["sample", "--run", str(path), "--prompt", "the", "--max-new-tokens", "4",
                 "--explain", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["step", "token", "prob", "runners-up"] and len(out) == 1 + 2 + 4
    assert main(["next-word", "--run", str(path), "the c", "-k", "3"]) == 0
    assert "probability" in capsys.readouterr().out
