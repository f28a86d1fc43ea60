"""The RNN encoder-decoder: context vector, padding, additive attention, LSTM switch."""

import pytest
import torch

from tinylm import rundir
from tinylm.models.rnn import RNNConfig, RNNEncoderDecoder

PAD = 0


def tiny(**kw) -> RNNEncoderDecoder:
    torch.manual_seed(0)
    cfg = RNNConfig(**{"vocab_size": 40, "d_model": 24, "dropout": 0.0} | kw)
    return RNNEncoderDecoder(cfg).eval()


@pytest.mark.parametrize("kw", [{}, {"attention": True}, {"cell": "lstm", "n_layer": 2},
                                {"cell": "lstm", "attention": True}])
def test_padding_changes_nothing(kw):
    """The context vector is the state after the last real token, not after the padding."""
    model = tiny(**kw)
    src = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, PAD, PAD, PAD]])
    tgt = torch.tensor([[1, 9, 10]])
    torch.testing.assert_close(model(src, tgt), model(padded, tgt))


def test_attention_rows_are_distributions_over_real_source_tokens():
    model = tiny(attention=True)
    model.decoder.keep_weights = True
    src = torch.tensor([[5, 6, 7, 8], [5, 6, PAD, PAD]])
    model(src, torch.tensor([[1, 9, 10], [1, 9, 10]]))
    w = torch.stack(model.decoder.weights, dim=1)  # (B, T, S)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))
    assert w[1, :, 2:].abs().max() == 0


def test_without_attention_the_decoder_sees_the_source_only_through_the_context_vector():
    model = tiny()
    src = torch.tensor([[5, 6, 7, 8]])
    state = model.start(src)
    state.memory = torch.randn_like(state.memory)  # scramble every encoder output ...
    logits = model.step(state, torch.tensor([1]))
    # ... and nothing changes: only the final state (context) is read
    torch.testing.assert_close(logits, model(src, torch.tensor([[1]]))[:, 0])


def test_step_decoding_matches_teacher_forcing_and_survives_save_load(tmp_path):
    model = tiny(attention=True, cell="lstm")
    src = torch.tensor([[5, 6, 7, PAD], [8, 9, 10, 11]])
    tgt = torch.tensor([[1, 12, 13], [1, 15, 16]])
    state = model.start(src)
    steps = torch.stack([model.step(state, tgt[:, t]) for t in range(3)], dim=1)
    torch.testing.assert_close(steps, model(src, tgt), atol=1e-5, rtol=1e-5)
    rundir.save_model(tmp_path, model)
    loaded = rundir.load_model(tmp_path, family="rnn").eval()
    torch.testing.assert_close(loaded(src, tgt), model(src, tgt))


def test_unknown_cell_is_refused():
    with pytest.raises(ValueError, match="cell"):
        RNNConfig(cell="rnn")
