// The autocomplete page: the likely next words as the user types; a click accepts one.
"use strict";

const $ = (id) => document.getElementById(id);
let asked = 0;  // the newest question; older answers that arrive late are dropped
let timer = null;

function partialWord(text) {
  const m = text.match(/(\S*)$/);
  return m ? m[1] : "";
}

function accept(s) {
  const area = $("text");
  area.value += s.text + " ";
  area.focus();
  suggest();
}

function show(words, text) {
  const box = $("suggestions");
  box.replaceChildren();
  const partial = partialWord(text);
  for (const s of words) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "suggestion";
    // Mid-word, a suggestion finishes the word being typed: show the whole word.
    const label = /^\s/.test(s.text) || !partial ? s.word : partial + s.word;
    const word = document.createElement("span");
    word.className = "word";
    word.textContent = label;  // text, never HTML
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = `${(s.prob * 100).toFixed(s.prob >= 0.1 ? 0 : 1)}%`;
    b.append(word, prob);
    b.addEventListener("click", () => accept(s));
    box.append(b);
  }
}

async function suggest() {
  const text = $("text").value;
  const mine = ++asked;
  try {
    const resp = await tinylm.post("/v1/suggest", { text, k: 5 });
    const { words } = await resp.json();
    if (mine === asked) {
      show(words, text);
      $("status").textContent = "";
    }
  } catch (e) {
    if (mine === asked) $("status").textContent = `error: ${e.message}`;
  }
}

function init() {
  tinylm.rememberKey();
  $("text").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(suggest, 150);
  });
  tinylm.model().catch((e) => { $("status").textContent = `error: ${e.message}`; });
  suggest();
}

init();
