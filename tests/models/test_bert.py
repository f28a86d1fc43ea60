import pytest
import torch
import torch.nn.functional as F

from tinylm.models.bert import BertConfig, BertModel, bert_style
from tinylm.train.loop import TrainConfig
from tinylm.train.optim import Muon, build_optimizers

PAD = 0


def tiny(style: str = "modern") -> BertModel:
    torch.manual_seed(0)
    make = bert_style if style == "bert-2018" else BertConfig
    cfg = make(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=32, zero_init=False)
    return BertModel(cfg).eval()


@pytest.mark.parametrize("style", ["modern", "bert-2018"])
def test_padding_changes_nothing_at_real_positions(style):
    model = tiny(style)
    ids = torch.tensor([[5, 9, 12, 7, 30]])
    padded = torch.cat([ids, torch.full((1, 3), PAD)], dim=1)  # (1, 8)
    alone = model(ids)
    in_padding = model(padded)[:, :5]
    torch.testing.assert_close(in_padding, alone, atol=1e-5, rtol=1e-5)


def test_a_batch_of_different_lengths_matches_each_sentence_alone():
    model = tiny()
    short, long = [4, 8, 15], [16, 23, 42, 11, 9, 3]
    batch = torch.tensor([short + [PAD] * 3, long])
    out = model(batch)
    torch.testing.assert_close(out[0, :3], model(torch.tensor([short]))[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], model(torch.tensor([long]))[0], atol=1e-5, rtol=1e-5)


def test_no_attention_weight_ever_lands_on_padding():
    model = tiny()
    for block in model.blocks:
        block.attn.keep_weights = True
    model(torch.tensor([[5, 9, 12, PAD, PAD], [5, 9, 12, 13, 14]]))
    for block in model.blocks:
        w = block.attn.weights  # (B, H, T, S)
        assert w.shape == (2, 2, 5, 5)
        assert torch.all(w[0, :, :, 3:] == 0)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 5))


def test_attention_is_bidirectional():
    model = tiny()
    a = model(torch.tensor([[5, 9, 12, 7]]))
    b = model(torch.tensor([[5, 9, 12, 8]]))  # only the last token differs
    assert not torch.allclose(a[0, 0], b[0, 0])  # ...yet the first position sees it


def test_loss_is_cross_entropy_over_masked_positions_only():
    model = tiny()
    idx = torch.randint(8, 50, (3, 10))
    targets = torch.full_like(idx, -100)
    targets[0, 2], targets[1, 7], targets[2, 0] = 11, 22, 33
    logits = model(idx)
    expected = F.cross_entropy(logits.view(-1, 50), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(model(idx, targets), expected)


def test_decoder_is_tied_to_the_embeddings_and_only_hidden_matrices_go_to_muon():
    model = tiny()
    assert model.mlm_head.decoder.weight is model.tok_emb.weight
    adam, muon = build_optimizers(model, TrainConfig(optimizer="muon"))
    assert isinstance(muon, Muon)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    adam_ids = {id(p) for g in adam.param_groups for p in g["params"]}
    head = model.mlm_head
    # The head's dense layer is a hidden matrix (Muon, by the model's own groups, where a
    # match on the name "head" used to send it to AdamW); decoder and norm are not.
    assert id(head.dense.weight) in muon_ids
    assert {id(head.decoder.weight), id(head.decoder.bias), id(head.norm.weight)} <= adam_ids
    assert id(model.blocks[0].attn.q.weight) in muon_ids
    assert not muon_ids & adam_ids
    every = {id(p) for p in model.parameters()}
    assert muon_ids | adam_ids == every


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.ones(1, 17, dtype=torch.long))
