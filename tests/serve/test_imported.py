"""`tinylm serve` of an imported model: a tiny random GQA Llama with SmolLM2's ChatML template,
imported from a transformers folder, answers chat completions through the official openai
client, with the prompt rendered by its own template and answers ending at <|im_end|>."""

from __future__ import annotations

import openai
import pytest

from tinylm import rundir
from tinylm.data import chat
from tinylm.serve.app import create_app
from tinylm.tokenizer import Tokenizer

from ..stages.test_sft_imported import SMOLLM2
from ..test_hf import hf_model, hf_tokenizer_chatml
from .conftest import LiveServer

transformers = pytest.importorskip("transformers")
QUESTION = [{"role": "user", "content": "Where is the dog?"}]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from tinylm.hf import import_hf

    root = tmp_path_factory.mktemp("serve-imported")
    fast = hf_tokenizer_chatml(root / "hf")
    fast.chat_template = SMOLLM2
    fast.save_pretrained(str(root / "hf"))
    hf_model("smollm2-like", fast).save_pretrained(str(root / "hf"))
    import_hf(root / "hf", root / "run")
    return root / "run"


def test_serve_of_an_imported_model_answers_a_chat_completion(imported):
    tok = Tokenizer.load(imported / "tokenizer.json")
    prompt = chat.render(tok, QUESTION, rundir.chat_template(imported),
                         add_generation_prompt=True).ids
    im_end = tok.special_id("<|im_end|>")
    with LiveServer(create_app(imported, dtype="fp32")) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                           max_tokens=6)
        # The prompt is SmolLM2's ChatML with its default system turn, rendered server-side.
        assert r.usage.prompt_tokens == len(prompt)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
        assert isinstance(r.choices[0].message.content, str)
        # A random model rarely says <|im_end|>; pushed to, the answer stops there (empty).
        stopped = client.chat.completions.create(model=model, messages=QUESTION,
                                                 temperature=0, max_tokens=6,
                                                 logit_bias={str(im_end): 100})
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].message.content == ""
        assert "<|im_end|>" not in r.choices[0].message.content
