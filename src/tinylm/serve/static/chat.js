// The chat page: a streamed conversation with history, sampling controls, stop, regenerate,
// edit, and each token's probability and runners-up on hover.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, messages: [], controller: null };
// messages: {role, content, tokens?: [{text, logprob, top: [{token, logprob}]}]}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;  // text, never HTML
  return node;
}

function showTip(span, info) {
  const tip = $("tip");
  tip.replaceChildren();
  tip.append(el("div", "tip-head", `${JSON.stringify(info.token)}  ${tinylm.percent(info.logprob)}`));
  const list = el("ol", "tip-list");
  for (const alt of info.top || []) {
    const item = el("li");
    item.append(el("code", null, JSON.stringify(alt.token)), " " + tinylm.percent(alt.logprob));
    list.append(item);
  }
  tip.append(list);
  const r = span.getBoundingClientRect();
  tip.style.left = `${Math.max(4, r.left + window.scrollX)}px`;
  tip.style.top = `${r.bottom + window.scrollY + 4}px`;
  tip.hidden = false;
}

function tokenSpan(piece) {
  const span = el("span", "token", piece.text);
  span.dataset.prob = tinylm.percent(piece.info.logprob);
  span.addEventListener("mouseenter", () => showTip(span, piece.info));
  span.addEventListener("mouseleave", () => { $("tip").hidden = true; });
  return span;
}

function renderMessage(m, i) {
  const box = el("div", `msg ${m.role}`);
  box.append(el("div", "role", m.role));
  const body = el("div", "content");
  if (m.pieces) body.append(...m.pieces.map(tokenSpan));
  else body.textContent = m.content;
  box.append(body);
  if (m.role === "user" && !state.controller) {
    const edit = el("button", "edit", "edit");
    edit.type = "button";
    edit.addEventListener("click", () => startEdit(i, box));
    box.append(edit);
  }
  return box;
}

function render() {
  $("log").replaceChildren(...state.messages.map(renderMessage));
  $("log").scrollTop = $("log").scrollHeight;
  const busy = !!state.controller;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || !state.messages.some((m) => m.role === "assistant");
}

function startEdit(i, box) {
  const area = el("textarea", "edit-area");
  area.value = state.messages[i].content;
  const save = el("button", null, "Send edited");
  save.type = "button";
  save.addEventListener("click", () => {
    state.messages = state.messages.slice(0, i);
    state.messages.push({ role: "user", content: area.value });
    generate();
  });
  box.querySelector(".content").replaceChildren(area, save);
  area.focus();
}

function requestBody() {
  const history = state.messages.filter((m) => !m.failed).map((m) => ({ role: m.role, content: m.content }));
  const system = $("system").value.trim();
  const body = {
    model: state.model, stream: true, logprobs: true, top_logprobs: 5,
    messages: system ? [{ role: "system", content: system }, ...history] : history,
    temperature: Number($("temperature").value || 0.7), top_p: Number($("top_p").value || 1),
  };
  if ($("max_tokens").value) body.max_tokens = Number($("max_tokens").value);
  if ($("seed").value) body.seed = Number($("seed").value);
  return body;
}

async function generate() {
  const answer = { role: "assistant", content: "", pieces: [] };
  const body = requestBody();
  state.messages.push(answer);
  state.controller = new AbortController();
  $("status").textContent = "…";
  render();
  const content = $("log").lastChild.querySelector(".content");
  let pending = [];  // logprobs of tokens whose text is still held back
  try {
    const resp = await tinylm.post("/v1/chat/completions", body, state.controller.signal);
    await tinylm.readEvents(resp, (chunk) => {
      const choice = chunk.choices[0];
      if (!choice) return;
      pending.push(...(choice.logprobs?.content || []));
      const text = choice.delta?.content;
      if (text) {
        const info = pending[pending.length - 1] || { token: text, logprob: 0, top: [] };
        const piece = { text, info: { token: info.token, logprob: info.logprob, top: info.top_logprobs } };
        pending = [];
        answer.content += text;
        answer.pieces.push(piece);
        content.append(tokenSpan(piece));
        $("log").scrollTop = $("log").scrollHeight;
      }
      if (choice.finish_reason) $("status").textContent = `finished: ${choice.finish_reason}`;
    });
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      $("status").textContent = `error: ${e.message}`;
      if (!answer.content) answer.failed = true;
    }
  } finally {
    state.controller = null;
    if (answer.failed) state.messages.pop();
    render();
  }
}

function send(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  state.messages.push({ role: "user", content: text });
  generate();
}

function init() {
  tinylm.rememberKey();
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("regenerate").addEventListener("click", () => {
    while (state.messages.length && state.messages[state.messages.length - 1].role === "assistant") {
      state.messages.pop();
    }
    if (state.messages.length) generate();
  });
  $("clear").addEventListener("click", () => { state.messages = []; render(); });
  tinylm.model().then((id) => { state.model = id; },
                      (e) => { $("status").textContent = `error: ${e.message}`; });
  render();
}

init();
