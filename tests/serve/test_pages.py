"""The chat and autocomplete pages in a real browser (Debian's Chromium through Playwright).

With CI=true these must run; elsewhere they are skipped only when Chromium is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import CHROMIUM, XSS

if os.environ.get("CI") != "true" and not Path(CHROMIUM).exists():
    pytest.skip("no Chromium at /usr/bin/chromium (CI=true makes this an error)",
                allow_module_level=True)


def say(page, text: str) -> str:
    page.fill("#input", text)
    page.click("#send")
    page.wait_for_selector("#status:has-text('finished')", timeout=30_000)
    return page.locator(".msg.assistant .content").last.inner_text()


def test_chat_streams_a_reply_and_keeps_the_history(server, page):
    page.goto(server.url + "/")
    page.fill("#temperature", "0")
    page.fill("#input", "Where is the cat?")
    page.click("#send")
    # Streamed: the reply arrives as token spans, each delta its own. (On a fast CPU the
    # whole reply can be ready before the server writes, and then one event carries several
    # tokens: so the count of spans is not checked, only that they make up the reply.)
    # (the page's CSP forbids eval, so waits are locators, not wait_for_function)
    page.locator(".msg.assistant .token").first.wait_for()
    page.wait_for_selector("#status:has-text('finished')", timeout=30_000)
    first = page.locator(".msg.assistant .content").last.inner_text()
    assert first.startswith("The cat is in the")
    spans = page.locator(".msg.assistant .token").all_inner_texts()
    assert "".join(spans) == first
    # Hovering a token shows its probability and runners-up.
    page.locator(".msg.assistant .token").first.hover()
    tip = page.locator("#tip")
    assert tip.is_visible() and "%" in tip.inner_text()
    assert tip.locator("li").count() == 5
    # History: a second turn, then regenerate (greedy: the same answer again).
    say(page, "Where is the dog?")
    assert page.locator(".msg").count() == 4
    page.click("#regenerate")
    page.wait_for_selector("#status:has-text('finished')")
    assert page.locator(".msg").count() == 4
    assert page.locator(".msg.assistant .content").last.inner_text().startswith("The dog")
    # Edit the first question: the conversation restarts from it.
    page.locator(".msg.user .edit").first.click()
    page.fill(".edit-area", "Where is the fox?")
    page.click("text=Send edited")
    page.wait_for_selector("#status:has-text('finished')")
    assert page.locator(".msg").count() == 2  # the later turns are gone
    assert page.locator(".msg.user .content").first.inner_text() == "Where is the fox?"
    assert page.locator(".msg.assistant .content").last.inner_text().startswith("The ")
    assert page.errors == []


def test_the_stop_button_ends_a_reply(server, page):
    """Stop aborts the reply in flight, and the page takes the next message. The request is
    held in the browser until Stop is clicked: the tiny model's whole reply can stream in a
    few milliseconds, before any click lands (on a fast CPU every try finished first, and
    retrying in one conversation outgrew the model's 96-token window)."""
    held = []

    def hold(route):  # answer nothing: the page waits on the request
        held.append(route)

    page.route("**/v1/chat/completions", hold)
    page.goto(server.url + "/")
    page.fill("#input", "Where is the cat?")
    page.click("#send")
    page.wait_for_selector("#stop:enabled")
    assert held and not page.is_enabled("#send")  # in flight
    page.click("#stop")
    page.wait_for_selector("#status:has-text('stopped')")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    page.unroute("**/v1/chat/completions")
    page.fill("#temperature", "0")
    assert say(page, "Where is the cat?").startswith("The cat is in the")  # usable again


def test_model_markup_is_shown_as_text_and_never_runs(server, page):
    page.goto(server.url + "/")
    page.fill("#temperature", "0")
    reply = say(page, "Show me HTML.")
    assert reply == XSS  # literally, the characters the model produced
    assert page.locator("#log script, #log img").count() == 0
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.errors == []


def test_autocomplete_suggests_words_and_a_click_accepts_one(server, page):
    page.goto(server.url + "/complete")
    page.fill("#text", "")
    page.type("#text", "Where is the", delay=20)
    first = page.locator(".suggestion").first
    first.wait_for(timeout=30_000)
    word = first.locator(".word").inner_text()
    prob = first.locator(".prob").inner_text()
    assert word.strip() and prob.endswith("%")
    first.click()
    value = page.input_value("#text")
    assert value.startswith("Where is the") and word in value and value.endswith(" ")
    page.locator(".suggestion").first.wait_for()
    assert page.errors == []


def test_pages_ask_for_the_key_and_work_with_it(make_server, browser):
    s = make_server(api_keys=["sesame"])
    context = browser.new_context(http_credentials={"username": "me", "password": "sesame"})
    page = context.new_page()
    page.goto(s.url + "/")
    page.fill("#temperature", "0")
    assert say(page, "Where is the cat?").startswith("The cat")
    context.close()
