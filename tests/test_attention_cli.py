"""`tinylm attention`: self-attention maps for GPT and BERT, cross-attention for translators."""

import pytest
import torch

from tinylm import rundir
from tinylm.cli import main
from tinylm.infer.attention import attention_maps
from tinylm.models.bert import BertConfig, BertModel
from tinylm.models.gpt import GPT, GPTConfig
from tinylm.models.rnn import RNNConfig, RNNEncoderDecoder
from tinylm.models.transformer import Transformer, TransformerConfig
from tinylm.tokenizer import train_char

TEXT = "the cat sat"


def make_run(path, model_fn):
    """A run dir holding an untrained model: attention maps need no training to be maps."""
    tok = train_char("the cat sat on a mat. J'ai froid.")
    torch.manual_seed(0)
    rundir.save_model(path, model_fn(tok))
    tok.save(path / "tokenizer.json")
    return path


RUNS = {
    "gpt": lambda t: GPT(GPTConfig(vocab_size=t.vocab_size, n_layer=2, n_head=2, d_model=16,
                                   block_size=32)),
    "bert": lambda t: BertModel(BertConfig(vocab_size=t.vocab_size, n_layer=2, n_head=2,
                                           d_model=16, block_size=32)),
    "transformer": lambda t: Transformer(TransformerConfig(
        vocab_size=t.vocab_size, n_layer=2, n_head=2, d_model=16, block_size=16)),
    "rnn-attn": lambda t: RNNEncoderDecoder(RNNConfig(vocab_size=t.vocab_size, d_model=16,
                                                      attention=True, block_size=16)),
    "rnn": lambda t: RNNEncoderDecoder(RNNConfig(vocab_size=t.vocab_size, d_model=16,
                                                 block_size=16)),
}


@pytest.mark.parametrize("name, kind, shape", [
    ("gpt", "self", (2, 2, 11, 11)), ("bert", "self", (2, 2, 11, 11)),
    ("transformer", "cross", (2, 2, None, 12)), ("rnn-attn", "cross", (1, 1, None, 12))])
def test_maps_have_a_panel_per_layer_and_head_and_rows_that_sum_to_one(tmp_path, name, kind,
                                                                         shape):
    maps = attention_maps(make_run(tmp_path / name, RUNS[name]), TEXT)
    assert maps.kind == kind
    L, H, T, S = maps.weights.shape
    assert (L, H, S) == (shape[0], shape[1], shape[3])  # 11 characters (+ EOS for a source)
    assert T == (shape[2] or len(maps.queries)) and S == len(maps.keys)
    torch.testing.assert_close(maps.weights.sum(-1), torch.ones(L, H, T))
    if name == "gpt":  # causal: nothing above the diagonal
        assert maps.weights.triu(1).abs().max() == 0


@pytest.mark.parametrize("name", ["gpt", "transformer"])
def test_cli_draws_a_png(tmp_path, capsys, name):
    run = make_run(tmp_path / name, RUNS[name])
    png = tmp_path / "attn.png"
    assert main(["attention", "--run", str(run), TEXT, "--png", str(png)]) == 0
    assert png.stat().st_size > 1000 and "wrote" in capsys.readouterr().out


def test_an_rnn_without_attention_has_no_map_to_draw(tmp_path, capsys):
    run = make_run(tmp_path / "rnn", RUNS["rnn"])
    assert main(["attention", "--run", str(run), TEXT, "--png", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "context vector" in err and "rnn.attention=true" in err and err.count("\n") == 1
