"""Fill in the blanks: the most likely tokens for each [MASK] in a sentence (masked LMs).

All blanks are filled from one forward pass, each independently of what the others become
(the model sees <|mask|> at every blank), exactly as BERT is trained. A blank is one token;
with a BPE tokenizer that is usually a whole common word, and tokens carry their leading space
(" dog"), so the space the user typed before [MASK] is folded into the blank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tinylm.errors import UserError
from tinylm.rundir import load_model, read_model_meta
from tinylm.tokenizer import MASK, SPECIAL_TOKENS, Tokenizer

PLACEHOLDER = "[MASK]"


@dataclass
class Blank:
    """One [MASK] of the prompt: where it sits in the ids, and its ranked candidates."""

    position: int
    candidates: list[tuple[str, float]]  # (decoded token, probability), most likely first
    ids: list[int]  # the candidates' token ids, same order


def load_masked_lm(run_dir: str | Path, device: str = "cpu"):
    """Model and tokenizer of a masked-LM run; a clear error for any other kind of run."""
    family = read_model_meta(Path(run_dir))["family"]
    if family != "bert":
        raise UserError(f"{run_dir} holds a {family} model; fill-mask needs a masked LM, "
                        "trained with `tinylm mlm`")
    model = load_model(Path(run_dir), family="bert", device=device).eval()
    return model, Tokenizer.load(Path(run_dir) / "tokenizer.json")


def encode_prompt(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` with every [MASK] (or <|mask|>) turned into the mask token."""
    if PLACEHOLDER not in text and MASK not in text:
        raise UserError(f"the prompt has no {PLACEHOLDER}; write {PLACEHOLDER} where a word is "
                        "missing, e.g. 'The [MASK] is chasing the ball.'")
    if tok.kind == "bpe":
        text = text.replace(" " + PLACEHOLDER, MASK)  # " dog" is one token: the space is its
    return tok.encode(text.replace(PLACEHOLDER, MASK))


@torch.no_grad()
def fill_mask(model, tok: Tokenizer, text: str, k: int = 5) -> list[Blank]:
    """The k most likely tokens, with probabilities, for every blank of `text`, in order."""
    ids = encode_prompt(tok, text)
    block = model.config.block_size
    if len(ids) > block:
        raise UserError(f"the prompt is {len(ids)} tokens, over the model's block_size={block};"
                        " shorten it")
    x = torch.tensor([ids], device=next(model.parameters()).device)  # (1, T)
    logits = model(x)[0]  # (T, V)
    # Special tokens are never targets in training; keep them out of the candidates.
    logits[:, [tok.special_id(t) for t in SPECIAL_TOKENS]] = float("-inf")
    probs = logits.softmax(-1)
    blanks = []
    for pos in (x[0] == tok.mask_id).nonzero().squeeze(1).tolist():
        top = torch.topk(probs[pos], min(k, probs.shape[-1]))
        top_ids = top.indices.tolist()
        cands = [(tok.decode([i]), p) for i, p in zip(top_ids, top.values.tolist())]
        blanks.append(Blank(pos, cands, top_ids))
    return blanks


def best_fill(tok: Tokenizer, text: str, blanks: list[Blank]) -> str:
    """`text` with each blank replaced by its top candidate."""
    ids = encode_prompt(tok, text)
    for blank in blanks:
        ids[blank.position] = blank.ids[0]
    return tok.decode(ids)
