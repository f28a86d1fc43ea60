"""Greedy and beam search over both encoder-decoder families."""

import itertools

import pytest
import torch

from tinylm.infer.beam import beam_search, greedy_search, length_penalty
from tinylm.models.rnn import RNNConfig, RNNEncoderDecoder
from tinylm.models.transformer import Transformer, TransformerConfig

BOS, EOS, PAD = 1, 2, 0


def model_of(family: str, vocab: int = 12, seed: int = 0):
    torch.manual_seed(seed)
    if family == "transformer":
        return Transformer(TransformerConfig(vocab_size=vocab, d_model=32, n_head=4, n_layer=1,
                                             block_size=12, dropout=0.0)).eval()
    return RNNEncoderDecoder(RNNConfig(vocab_size=vocab, d_model=32, attention=True,
                                       dropout=0.0, block_size=12)).eval()


SRC = torch.tensor([[5, 6, 7, 8, EOS], [9, 3, EOS, PAD, PAD], [4, 4, 10, EOS, PAD]])


@pytest.mark.parametrize("family", ["transformer", "rnn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_size_one_is_greedy(family, seed):
    model = model_of(family, seed=seed)
    for alpha in (0.0, 0.6):
        assert beam_search(model, SRC, BOS, EOS, 10, beam_size=1, alpha=alpha) == \
            greedy_search(model, SRC, BOS, EOS, 10)


@pytest.mark.parametrize("family", ["transformer", "rnn"])
def test_each_row_is_decoded_as_if_alone(family):
    model = model_of(family)
    together = beam_search(model, SRC, BOS, EOS, 10, beam_size=3)
    alone = [beam_search(model, SRC[i : i + 1, : int((SRC[i] != PAD).sum())], BOS, EOS, 10,
                         beam_size=3)[0] for i in range(len(SRC))]
    assert together == alone


def logprob(model, src, ids: list[int]) -> float:
    logits = model(src, torch.tensor([[BOS] + ids[:-1]]))[0].log_softmax(-1)  # (T, V)
    return sum(logits[t, tok].item() for t, tok in enumerate(ids))


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 5, 7, 9])  # seeds where greedy misses the best
def test_a_beam_wider_than_the_search_space_finds_the_exhaustive_best(seed):
    """5 tokens, at most 3 steps: 64 beams never prune, so beam search must return the best
    of all outputs: those that end in EOS, and the unfinished ones cut at max_len."""
    torch.manual_seed(seed)
    model = Transformer(TransformerConfig(vocab_size=5, d_model=16, n_head=2, n_layer=1,
                                          block_size=4, dropout=0.0, tie_embeddings=False))
    model.eval()
    src = torch.tensor([[3, 4, EOS]])
    others = [t for t in range(5) if t != EOS]
    finished = [list(c) + [EOS] for n in range(3) for c in itertools.product(others, repeat=n)]
    cut = [list(c) for c in itertools.product(others, repeat=3)]
    best = max(finished + cut, key=lambda ids: logprob(model, src, ids))
    expected = best[:-1] if best[-1] == EOS else best
    assert beam_search(model, src, BOS, EOS, 3, beam_size=64, alpha=0.0)[0] == expected
    assert greedy_search(model, src, BOS, EOS, 3)[0] != expected


def test_length_penalty_is_one_for_alpha_zero_and_grows_with_length():
    assert length_penalty(7, 0.0) == 1.0
    assert length_penalty(1, 0.6) == 1.0 and length_penalty(10, 0.6) > length_penalty(5, 0.6)


def test_outputs_never_exceed_max_len_and_never_hold_bos_or_eos():
    model = model_of("rnn")
    for hyp in beam_search(model, SRC, BOS, EOS, 5, beam_size=4):
        assert len(hyp) <= 5 and BOS not in hyp and EOS not in hyp
