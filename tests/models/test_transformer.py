"""The Transformer encoder-decoder: masks, teacher forcing, step decoding, switches."""

import pytest
import torch

from tinylm import rundir
from tinylm.models.transformer import Transformer, TransformerConfig

PAD = 0


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(**{"vocab_size": 40, "d_model": 32, "n_head": 4, "n_layer": 2,
                               "block_size": 16, "dropout": 0.0} | kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("post_norm", [False, True])
def test_padding_in_the_source_is_never_attended(post_norm):
    model = tiny(post_norm=post_norm)
    src = torch.tensor([[5, 6, 7, PAD, PAD], [5, 6, 7, 8, 9]])
    tgt = torch.tensor([[1, 9, 10], [1, 9, 10]])
    padded_more = torch.cat([src, torch.full((2, 4), PAD)], dim=1)  # same rows, more padding
    a, b = model(src, tgt), model(padded_more, tgt)
    torch.testing.assert_close(a, b)
    # and no padding token's value leaks through cross-attention
    for block in model.decoder.blocks:
        block.cross.keep_weights = True
    model(padded_more, tgt)
    for block in model.decoder.blocks:
        assert block.cross.weights[0, ..., 3:].abs().max() == 0
        assert block.cross.weights[1, ..., 5:].abs().max() == 0


def test_decoder_is_causal():
    model = tiny()
    src = torch.tensor([[5, 6, 7, 8]])
    tgt = torch.tensor([[1, 9, 10, 11, 12]])
    changed = tgt.clone()
    changed[0, 3:] = torch.tensor([30, 31])
    a, b = model(src, tgt), model(src, changed)
    torch.testing.assert_close(a[:, :3], b[:, :3])  # earlier positions never see later ones
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_step_decoding_matches_teacher_forcing():
    model = tiny()
    src = torch.tensor([[5, 6, 7, PAD], [8, 9, 10, 11]])
    tgt = torch.tensor([[1, 12, 13, 14], [1, 15, 16, 17]])
    state = model.start(src)
    steps = torch.stack([model.step(state, tgt[:, t]) for t in range(4)], dim=1)
    torch.testing.assert_close(steps, model(src, tgt), atol=1e-5, rtol=1e-5)


def test_loss_ignores_padded_targets():
    model = tiny()
    src = torch.tensor([[5, 6, 7]])
    tgt_in, tgt_out = torch.tensor([[1, 9, 10, 0]]), torch.tensor([[9, 10, 2, -100]])
    logits = model(src, tgt_in)
    expected = torch.nn.functional.cross_entropy(logits[0, :3], tgt_out[0, :3])
    torch.testing.assert_close(model(src, tgt_in, tgt_out), expected)


def test_separate_vocabularies_and_save_load_roundtrip(tmp_path):
    model = tiny(tgt_vocab_size=25)
    assert model.src_emb is not model.tgt_emb
    src, tgt = torch.tensor([[5, 39]]), torch.tensor([[1, 24]])
    assert model(src, tgt).shape == (1, 2, 25)
    rundir.save_model(tmp_path, model)
    loaded = rundir.load_model(tmp_path, family="transformer").eval()
    torch.testing.assert_close(loaded(src, tgt), model(src, tgt))


def test_shared_vocabulary_ties_source_target_and_output_embeddings():
    model = tiny()
    assert model.generator.proj.weight is model.src_emb.tok.weight
    assert model.tgt_emb is model.src_emb


def test_too_long_a_sequence_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.ones(1, 17, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
