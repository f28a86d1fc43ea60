"""`tinylm sft --init` on an imported model: a tiny random GQA Llama with SmolLM2's ChatML
template and its own special tokens (<|im_start|>, <|im_end|>), imported from a transformers
folder written here, fine-tunes through its own template and keeps template and tokens."""

from __future__ import annotations

import json

import pytest
import torch

from tinylm import rundir
from tinylm.cli import main
from tinylm.data import chat
from tinylm.eval.chat import assistant_loss
from tinylm.hf import import_hf
from tinylm.infer.chat import turn_end_ids
from tinylm.tokenizer import Tokenizer

from ..test_hf import hf_model, hf_tokenizer_chatml
from .test_sft import conversations

transformers = pytest.importorskip("transformers")

# SmolLM2-135M-Instruct's own template, verbatim: ChatML with a default system turn.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' "
           "%}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
           "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
           "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt "
           "%}{{ '<|im_start|>assistant\n' }}{% endif %}")
TWO_TURNS = [{"role": "user", "content": "Where is the dog?"},
             {"role": "assistant", "content": "The dog is in the park."},
             {"role": "user", "content": "And the ball?"},
             {"role": "assistant", "content": "A red ball."}]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(run dir, transformers tokenizer) of a random SmolLM2-like Llama: 6 query heads over
    2 key/value heads, tied embeddings, eps 1e-5, SmolLM2's template."""
    root = tmp_path_factory.mktemp("imported")
    fast = hf_tokenizer_chatml(root / "hf")
    fast.chat_template = SMOLLM2
    fast.save_pretrained(str(root / "hf"))
    hf_model("smollm2-like", fast).save_pretrained(str(root / "hf"))
    assert import_hf(root / "hf", root / "run") == []  # no tinylm token added
    return root / "run", fast


def test_the_mask_is_the_assistant_content_and_im_end_exactly(imported):
    """Each assistant turn's mask covers its content's tokens and <|im_end|>: not the
    newline ChatML writes after <|im_end|>, not the default system turn, not the user's."""
    run, fast = imported
    tok = Tokenizer.load(run / "tokenizer.json")
    r = chat.render(tok, TWO_TURNS, rundir.chat_template(run))
    theirs = fast.apply_chat_template(TWO_TURNS, tokenize=True)
    assert r.ids == list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    im_end = tok.special_id("<|im_end|>")
    want = [tok.encode("The dog is in the park.") + [im_end], tok.encode("A red ball.") + [im_end]]
    spans, k = [], 0
    while k < len(r.mask):  # the runs of 1s
        if r.mask[k]:
            j = k
            while j < len(r.mask) and r.mask[j]:
                j += 1
            spans.append(r.ids[k:j])
            k = j
        else:
            k += 1
    assert spans == want
    assert tok.decode(r.ids[len(r.ids) - 1 :]) == "\n" and r.mask[-1] == 0
    assert turn_end_ids(tok, rundir.chat_template(run)) == [im_end]


def test_sft_init_lowers_the_assistant_loss_and_keeps_template_and_tokens(imported, tmp_path):
    run, fast = imported
    rows = conversations()
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer.load(run / "tokenizer.json")
    template = rundir.chat_template(run)
    _, held = chat.split(chat.read_conversations(tmp_path / "chats.jsonl"), 0.2, 0)
    model, _ = rundir.load(run)
    block = model.config.block_size
    held_data = chat.ChatData([chat.render(tok, c, template) for c in held], block, tok.pad_id)
    assert len(held_data) == len(held) and held_data.dropped == 0  # all within the window
    before = assistant_loss(model, held_data, 16)
    out = tmp_path / "sft"
    sets = ["data.val_fraction=0.2", "train.steps=40", "train.batch_size=8", "train.lr=3e-3",
            "train.optimizer=adamw", "train.progress=false", "train.eval_every=0",
            "train.dtype=float32"]
    assert main(["sft", "--init", str(run), "--data", str(tmp_path / "chats.jsonl"), "--out",
                 str(out)] + [a for s in sets for a in ("--set", s)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val_loss = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    assert val_loss < before - 1.0, (before, val_loss)
    assert rundir.chat_template(out) == SMOLLM2
    after = Tokenizer.load(out / "tokenizer.json")
    assert after.to_str() == tok.to_str() and after.roles == tok.roles
    assert (after.bos_id, after.eos_id) == (fast.bos_token_id, fast.eos_token_id)
    tuned, _ = rundir.load(out)
    assert tuned.config.vocab_size == model.config.vocab_size == len(fast)
    assert tuned.config.kv_heads == 2 and tuned.config.tie_embeddings
    assert tuned.lm_head.weight is tuned.tok_emb.weight  # still one tensor after training
    assert not torch.equal(tuned.tok_emb.weight, model.tok_emb.weight)  # and it was trained
