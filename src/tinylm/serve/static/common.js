// Shared by the pages: API calls (with the optional key) and the server-sent-event reader.
// Model output only ever reaches the page through textContent, never innerHTML.
"use strict";

const tinylm = {
  headers() {
    const h = { "Content-Type": "application/json" };
    const key = document.getElementById("key")?.value || sessionStorage.getItem("tinylm-key");
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  },

  rememberKey() {
    const input = document.getElementById("key");
    if (!input) return;
    input.value = sessionStorage.getItem("tinylm-key") || "";
    input.addEventListener("change", () => sessionStorage.setItem("tinylm-key", input.value));
  },

  async error(resp) {
    try {
      const body = await resp.json();
      return `${resp.status}: ${body.error?.message || resp.statusText}`;
    } catch {
      return `${resp.status}: ${resp.statusText}`;
    }
  },

  async model() {
    const resp = await fetch("/v1/models", { headers: this.headers() });
    if (!resp.ok) throw new Error(await this.error(resp));
    const id = (await resp.json()).data[0].id;
    document.getElementById("model").textContent = id;
    return id;
  },

  async post(path, body, signal) {
    const resp = await fetch(path, { method: "POST", headers: this.headers(),
                                     body: JSON.stringify(body), signal });
    if (!resp.ok) throw new Error(await this.error(resp));
    return resp;
  },

  // Calls onData(object) for every `data:` event of a text/event-stream response.
  async readEvents(resp, onData) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          onData(obj);
        }
      }
    }
  },

  percent(logprob) {
    const p = Math.exp(logprob) * 100;
    return (p >= 10 ? p.toFixed(0) : p >= 1 ? p.toFixed(1) : p.toFixed(2)) + "%";
  },
};
