"""A tiny chat-format run and live servers on 127.0.0.1 (uvicorn in a thread) for the tests.

The run is a GPT pre-trained for a few seconds on conversations rendered through tinylm's chat
template, so it answers in the chat format: "Where is the cat?" gets "The cat is in the ...",
and "Show me HTML." gets markup (the browser tests check it is shown, never run).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from tinylm import config as configlib
from tinylm.data import chat
from tinylm.serve.app import Limits, create_app
from tinylm.stages import pretrain
from tinylm.stages.pretrain import PretrainConfig

from ..conftest import TINY_OVERRIDES
from ..stages.test_sft import conversations

XSS = '<script>pwned=1</script><img src=x onerror=pwned=2>'
STORY = "The cat sat on the mat. The dog is in the park. The bird is in the tree. "


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    convs = [c["messages"] for c in conversations()]
    convs += [[{"role": "user", "content": "Show me HTML."},
               {"role": "assistant", "content": XSS}]] * 10
    text = "".join(chat.render_text(m, chat.TEMPLATE) for m in convs) + STORY * 20
    (root / "corpus.txt").write_text(text * 3, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLM_CACHE", str(root / "cache"))
        pretrain.run(configlib.load(PretrainConfig, None, [
            f"out='{root / 'run'}'", f"data.corpus='{root / 'corpus.txt'}'", *TINY_OVERRIDES,
            # swiglu: export-hf (for lm-evaluation-harness's hf side) needs Llama/Qwen3 parts.
            "model.block_size=96", "model.mlp='swiglu'", "train.steps=200",
            "train.batch_size=8", "train.lr=5e-3", "train.muon_lr=0.02", "train.eval_every=0"]))
    return root / "run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving create_app(...) in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def server(serve_run):
    """The server most tests share: default limits, no key."""
    with LiveServer(create_app(serve_run, dtype="fp32")) as s:
        yield s


@pytest.fixture
def make_server(serve_run):
    """make_server(api_keys=..., **limits): a server of its own for one test."""
    servers = []

    def make(api_keys=(), **limits) -> LiveServer:
        s = LiveServer(create_app(serve_run, api_keys, Limits(**limits), dtype="fp32"))
        servers.append(s.__enter__())
        return s

    yield make
    for s in servers:
        s.__exit__()


# --- a real browser for the page tests (Debian's Chromium through Playwright) ----------------
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    context.close()
