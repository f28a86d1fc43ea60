// The ranking page: one prompt, K answers, put in order best first (drag the handle, the
// arrow buttons, or the keys), ties, "all bad", a better answer, skip with a reason.
// Answers reach the page only through textContent, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const LONG = 400; // characters: longer answers start collapsed
let current = null; // the comparison shown: {comparison_id, messages, answers, key}
let busy = false;

function labeler() {
  return $("labeler").value.trim();
}

function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16)); // no randomUUID off https
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function say(text) {
  $("status").textContent = text;
}

function fail(text) {
  $("error").textContent = text;
}

function cards() {
  return Array.from($("answers").children);
}

// --- showing a comparison -------------------------------------------------------------------
function showPrompt(messages) {
  const box = $("prompt");
  box.replaceChildren();
  for (const m of messages) {
    const turn = document.createElement("div");
    turn.className = "turn";
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = m.role;
    const text = document.createElement("span");
    text.textContent = m.content;
    turn.append(role, text);
    box.append(turn);
  }
}

function button(text, title, onClick, cls) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.title = title;
  if (cls) b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

function card(answer) {
  const li = document.createElement("li");
  li.className = "answer";
  li.tabIndex = 0;
  li.dataset.id = answer.id;
  const handle = button("⠿", "drag to reorder", () => {}, "handle");
  handle.setAttribute("aria-label", "drag to reorder");
  handle.addEventListener("pointerdown", (e) => startDrag(e, li));
  const place = document.createElement("span");
  place.className = "place";
  const body = document.createElement("div");
  body.className = "body";
  const text = document.createElement("p");
  text.className = "text";
  text.textContent = answer.text;
  const controls = document.createElement("div");
  controls.className = "controls";
  const tie = document.createElement("label");
  const box = document.createElement("input");
  box.type = "checkbox";
  box.className = "tie";
  box.addEventListener("change", renumber);
  tie.append(box, " tie with the one above");
  controls.append(button("▲", "move up", () => move(li, -1), "up"),
                  button("▼", "move down", () => move(li, 1), "down"), tie);
  if (answer.text.length > LONG) {
    li.classList.add("collapsed");
    controls.append(button("show all", "open or close the answer", () => toggle(li), "more"));
  }
  body.append(text, controls);
  li.append(handle, place, body);
  return li;
}

function toggle(li) {
  if (!li.querySelector(".more")) return;
  li.classList.toggle("collapsed");
  li.querySelector(".more").textContent = li.classList.contains("collapsed") ? "show all"
                                                                            : "show less";
}

function show(c) {
  current = { ...c, key: newKey() };
  showPrompt(c.messages);
  $("answers").replaceChildren(...c.answers.map(card));
  $("all-bad").checked = false;
  $("demonstration").value = "";
  $("skip-reason").value = "";
  $("task").hidden = false;
  $("done").hidden = true;
  renumber();
}

// Places: 1 for the first tier, and so on; a tied answer shares the place above it.
function renumber() {
  let place = 0;
  cards().forEach((li, i) => {
    const tie = li.querySelector(".tie");
    if (i === 0) tie.checked = false;
    tie.disabled = i === 0;
    if (!tie.checked) place += 1;
    li.classList.toggle("tied", tie.checked);
    li.querySelector(".place").textContent = place + ".";
  });
}

function order() {
  const tiers = [];
  for (const li of cards()) {
    const id = Number(li.dataset.id);
    if (li.querySelector(".tie").checked && tiers.length) tiers[tiers.length - 1].push(id);
    else tiers.push([id]);
  }
  return tiers;
}

// --- reordering -----------------------------------------------------------------------------
function move(li, by) {
  const list = cards();
  const to = Math.max(0, Math.min(list.length - 1, list.indexOf(li) + by));
  placeAt(li, to);
}

function placeAt(li, to) {
  const rest = cards().filter((x) => x !== li);
  $("answers").insertBefore(li, rest[to] || null);
  renumber();
  li.focus();
}

// Only the handle starts a drag, so scrolling the page or an answer never reorders anything.
// The moves are followed on the window: moving the card in the document drops any pointer
// capture the handle had.
function startDrag(e, li) {
  e.preventDefault();
  li.classList.add("dragging");
  const onMove = (ev) => {
    if (ev.pointerId !== e.pointerId) return;
    const others = cards().filter((x) => x !== li);
    let to = others.length;
    for (let i = 0; i < others.length; i++) {
      const r = others[i].getBoundingClientRect();
      if (ev.clientY < r.top + r.height / 2) { to = i; break; }
    }
    if (cards().indexOf(li) !== to) {
      $("answers").insertBefore(li, others[to] || null);
      renumber();
    }
  };
  const onUp = (ev) => {
    if (ev.pointerId !== e.pointerId) return;
    li.classList.remove("dragging");
    window.removeEventListener("pointermove", onMove);
    window.removeEventListener("pointerup", onUp);
    window.removeEventListener("pointercancel", onUp);
    li.focus();
  };
  window.addEventListener("pointermove", onMove);
  window.addEventListener("pointerup", onUp);
  window.addEventListener("pointercancel", onUp);
}

function onKey(e) {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("task").hidden) {
    e.preventDefault();
    submit();
    return;
  }
  const li = e.target.closest ? e.target.closest(".answer") : null;
  if (!li || e.target !== li) return; // typing in a field is typing, not a shortcut
  const list = cards();
  const at = list.indexOf(li);
  const focus = (i) => list[Math.max(0, Math.min(list.length - 1, i))].focus();
  if ((e.key === "ArrowUp" || e.key === "ArrowDown") && e.shiftKey) {
    move(li, e.key === "ArrowUp" ? -1 : 1);
  } else if (e.key === "ArrowUp" || e.key === "k") {
    focus(at - 1);
  } else if (e.key === "ArrowDown" || e.key === "j") {
    focus(at + 1);
  } else if (/^[1-9]$/.test(e.key) && Number(e.key) <= list.length) {
    placeAt(li, Number(e.key) - 1);
  } else if (e.key === "t" && at > 0) {
    const tie = li.querySelector(".tie");
    tie.checked = !tie.checked;
    renumber();
  } else if (e.key === "o") {
    toggle(li);
  } else {
    return;
  }
  e.preventDefault();
}

// --- talking to the server ------------------------------------------------------------------
async function next() {
  fail("");
  say("loading the next prompt (sampling answers if it has none yet)…");
  const url = "/v1/label/next?labeler=" + encodeURIComponent(labeler());
  const resp = await fetch(url, { headers: tinylm.headers() });
  if (!resp.ok) throw new Error(await tinylm.error(resp));
  const body = await resp.json();
  showStats(body.stats);
  if (body.comparison) {
    show(body.comparison);
    say("");
    cards()[0].focus();
  } else {
    current = null;
    $("task").hidden = true;
    $("done").hidden = false;
    say("");
  }
}

async function send(path, payload, what) {
  if (busy || !current) return;
  busy = true;
  $("submit").disabled = $("skip").disabled = true;
  try {
    const resp = await tinylm.post(path, payload);
    const body = await resp.json();
    say(`${what} stored (#${body.ranking_id ?? body.skip_id}).`);
    await next();
  } catch (err) {
    // The same key goes with a retry, so a submit whose reply was lost is stored once.
    fail(`not stored: ${err.message}`);
  } finally {
    busy = false;
    $("submit").disabled = $("skip").disabled = false;
  }
}

function submit() {
  const allBad = $("all-bad").checked;
  const demo = $("demonstration").value.trim();
  return send("/v1/label/rankings", {
    comparison_id: current.comparison_id, labeler: labeler(), key: current.key,
    order: allBad ? [] : order(), all_bad: allBad, demonstration: demo || null,
  }, allBad ? "“all bad”" : "ranking");
}

function skip() {
  const reason = $("skip-reason").value.trim();
  if (!reason) {
    fail("give a reason to skip");
    $("skip-reason").focus();
    return;
  }
  return send("/v1/label/skip", {
    comparison_id: current.comparison_id, labeler: labeler(), key: current.key + ":skip",
    reason,
  }, "skip");
}

function showStats(stats) {
  if (!stats) return;
  const me = stats.me || { done: 0, left: 0 };
  $("progress").textContent = `${labeler()}: ${me.done} done, ${me.left} left`;
  const rows = Object.entries(stats.labelers).map(([name, n]) => {
    const tr = document.createElement("tr");
    for (const v of [name, n.rankings, n.skips, n.demonstrations]) {
      const td = document.createElement("td");
      td.textContent = String(v);
      tr.append(td);
    }
    return tr;
  });
  $("stats").tBodies[0].replaceChildren(...rows);
  const a = stats.agreement;
  $("agreement").textContent = a.agreement === null
    ? "agreement: no comparison ranked by two labelers yet"
    : `agreement: ${(a.agreement * 100).toFixed(0)}% of ${a.pairs} pairs over ` +
      `${a.comparisons} comparisons ranked by two or more labelers`;
}

async function start(e) {
  if (e) e.preventDefault();
  if (!labeler()) {
    fail("enter your labeler name first");
    return;
  }
  localStorage.setItem("tinylm-labeler", labeler());
  try {
    await next();
  } catch (err) {
    fail(err.message);
    say("");
  }
}

function init() {
  tinylm.rememberKey();
  const fromUrl = new URLSearchParams(location.search).get("labeler");
  $("labeler").value = fromUrl || localStorage.getItem("tinylm-labeler") || "";
  $("who").addEventListener("submit", start);
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  document.addEventListener("keydown", onKey);
  if (labeler()) start();
}

init();
