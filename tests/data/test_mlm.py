import pytest
import torch

from tinylm.data.mlm import IGNORE, Masker, MaskingConfig
from tinylm.tokenizer import SPECIAL_TOKENS, train_char


@pytest.fixture(scope="module")
def tok():
    return train_char("the quick brown fox jumps over the lazy dog. THE END!")


def real_windows(tok, B: int, T: int, seed: int = 0) -> torch.Tensor:
    """Random windows of real (non-special) token ids."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIAL_TOKENS), tok.vocab_size, (B, T), generator=gen)


def test_fifteen_percent_chosen_and_split_80_10_10(tok):
    ids = real_windows(tok, 64, 512)  # 32k tokens: ~4.9k chosen, sd of fractions ~0.5%
    inputs, targets = Masker(tok)(ids, torch.Generator().manual_seed(1))
    chosen = targets != IGNORE
    n = chosen.sum().item()
    assert abs(n / ids.numel() - 0.15) < 0.01
    masked = (inputs == tok.mask_id) & chosen
    changed = (inputs != ids) & (inputs != tok.mask_id) & chosen
    kept = (inputs == ids) & chosen
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    # a random replacement can hit the original token by chance (1 in ~100 here)
    assert abs((changed.sum().item() + kept.sum().item()) / n - 0.2) < 0.02
    assert abs(changed.sum().item() / n - 0.1) < 0.02
    assert torch.equal(targets[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_padding_and_special_tokens_are_never_chosen_nor_inserted(tok):
    ids = real_windows(tok, 32, 64)
    specials = torch.tensor([tok.special_id(t) for t in SPECIAL_TOKENS])
    ids[:, 40:] = tok.pad_id  # right padding
    ids[:, 0] = tok.bos_id
    ids[:, 20] = tok.eos_id
    cfg = MaskingConfig(prob=0.5, mask=0.0, random=1.0)  # every chosen token gets a random one
    inputs, targets = Masker(tok, cfg)(ids, torch.Generator().manual_seed(2))
    chosen = targets != IGNORE
    assert not torch.isin(ids[chosen], specials).any()
    assert chosen[:, 1:20].any()  # real tokens are chosen
    assert not torch.isin(inputs[chosen], specials).any()
    assert torch.equal(inputs[:, 40:], ids[:, 40:])


def test_masks_are_a_function_of_the_generator_seed(tok):
    ids = real_windows(tok, 8, 32)
    masker = Masker(tok)
    a = masker(ids, torch.Generator().manual_seed(7))
    b = masker(ids, torch.Generator().manual_seed(7))
    c = masker(ids, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_every_row_gets_at_least_one_target(tok):
    ids = real_windows(tok, 200, 3)  # 15% of 3 tokens: most rows would get nothing
    _, targets = Masker(tok)(ids, torch.Generator().manual_seed(3))
    assert ((targets != IGNORE).sum(dim=1) >= 1).all()


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="sum"):
        MaskingConfig(mask=0.8, random=0.3)
    with pytest.raises(ValueError, match="prob"):
        MaskingConfig(prob=0.0)
