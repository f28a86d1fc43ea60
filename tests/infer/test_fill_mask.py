import pytest
import torch

from tinylm.errors import UserError
from tinylm.infer.fill_mask import best_fill, encode_prompt, fill_mask
from tinylm.models.bert import BertConfig, BertModel
from tinylm.tokenizer import SPECIAL_TOKENS, train_bpe, train_char

TEXT = "The dog is chasing the ball. The cat is chasing the dog. " * 20


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXT, 300)


def test_the_space_before_a_mask_belongs_to_the_masked_word(bpe):
    ids = encode_prompt(bpe, "The [MASK] is chasing the [MASK].")
    tokens = [bpe.id_to_token(i) for i in ids]
    assert tokens[:3] == ["The", "<|mask|>", "Ġis"]  # " dog" would be one token: Ġdog
    assert ids.count(bpe.mask_id) == 2


def test_a_character_model_masks_one_character_and_keeps_spaces():
    tok = train_char(TEXT)
    ids = encode_prompt(tok, "a [MASK] b")
    assert tok.decode(ids) == "a <|mask|> b"


def test_a_prompt_without_mask_is_refused(bpe):
    with pytest.raises(UserError, match=r"no \[MASK\]"):
        encode_prompt(bpe, "The dog is chasing the ball.")


def test_each_mask_gets_k_ranked_real_candidates(bpe):
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=bpe.vocab_size, block_size=32, n_layer=1,
                                 n_head=2, d_model=32)).eval()
    text = "[MASK] dog is chasing the [MASK]."
    blanks = fill_mask(model, bpe, text, k=4)
    assert len(blanks) == 2
    specials = {bpe.special_id(t) for t in SPECIAL_TOKENS}
    for blank in blanks:
        probs = [p for _, p in blank.candidates]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True) and probs[0] <= 1
        assert not specials & set(blank.ids)
    filled = best_fill(bpe, text, blanks)
    assert filled.endswith(blanks[1].candidates[0][0] + ".") and "<|mask|>" not in filled
