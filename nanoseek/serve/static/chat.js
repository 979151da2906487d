// nanoseek chat page: streams /v1/chat/completions token by token. The conversation lives
// in `messages` (OpenAI's format) and in localStorage, so a reload keeps it. Text is put in
// the page with textContent only: nothing the model writes is parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"),
  regenerate: $("regenerate"), temperature: $("temperature"), thinking: $("thinking"),
  maxTokens: $("max-tokens"), apiKey: $("api-key"), status: $("status"), model: $("model"),
  newChat: $("new-chat"),
};
const store = {
  get: (k, d) => { try { return JSON.parse(localStorage.getItem("nanoseek." + k)) ?? d; } catch { return d; } },
  set: (k, v) => localStorage.setItem("nanoseek." + k, JSON.stringify(v)),
};

let messages = store.get("messages", []);
let controller = null; // the request in flight, if any

function headers() {
  const h = { "Content-Type": "application/json" };
  if (els.apiKey.value) h.Authorization = "Bearer " + els.apiKey.value;
  return h;
}

function bubble(role) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role === "user" ? "you" : "nanoseek";
  div.appendChild(label);
  const details = document.createElement("details");
  details.className = "reasoning";
  details.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "Reasoning";
  const thought = document.createElement("div");
  thought.className = "thought";
  details.append(summary, thought);
  const content = document.createElement("div");
  content.className = "content";
  div.append(details, content);
  els.messages.appendChild(div);
  return { div, details, thought, content };
}

function showMessage(m) {
  const b = bubble(m.role);
  if (m.reasoning_content) {
    b.details.hidden = false;
    b.thought.textContent = m.reasoning_content;
  }
  b.content.textContent = m.content;
  if (m.note) b.div.querySelector(".role").textContent += " · " + m.note;
  return b;
}

function render() {
  els.messages.replaceChildren();
  messages.forEach(showMessage);
  els.messages.scrollTop = els.messages.scrollHeight;
  setBusy(false);
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  els.send.disabled = busy;
  els.stop.disabled = !busy;
  const last = messages[messages.length - 1];
  els.regenerate.disabled = busy || !last || last.role !== "assistant";
}

function save() {
  store.set("messages", messages);
}

// The SSE stream as parsed JSON events; `[DONE]` ends it.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function complete() {
  const request = {
    messages: messages.map(({ role, content }) => ({ role, content })),
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number(els.temperature.value),
  };
  if (els.thinking.value !== "auto") request.thinking = els.thinking.value === "on";
  if (els.maxTokens.value) request.max_tokens = Number(els.maxTokens.value);
  const reply = { role: "assistant", content: "", reasoning_content: "" };
  const b = bubble("assistant");
  b.details.open = true;
  controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null;
  let note = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error?.message || response.status + " " + response.statusText);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) {
        const secs = (performance.now() - (tFirst ?? t0)) / 1000;
        const n = chunk.usage.completion_tokens;
        els.status.textContent = `${n} tokens, ${(n / Math.max(secs, 1e-3)).toFixed(1)} tok/s, ` +
          `first token after ${(((tFirst ?? t0) - t0) / 1000).toFixed(2)} s`;
      }
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const d = choice.delta || {};
      if (d.reasoning_content) {
        tFirst ??= performance.now();
        reply.reasoning_content += d.reasoning_content;
        b.details.hidden = false;
        b.thought.textContent = reply.reasoning_content;
      }
      if (d.content) {
        tFirst ??= performance.now();
        reply.content += d.content;
        b.content.textContent = reply.content;
      }
      if (choice.finish_reason === "length") note = "cut at max tokens";
      els.messages.scrollTop = els.messages.scrollHeight;
    }
  } catch (err) {
    if (err.name === "AbortError") {
      note = "stopped";
    } else {
      b.div.classList.add("error");
      b.content.textContent = (reply.content ? reply.content + "\n" : "") + "Error: " + err.message;
      controller = null;
      setBusy(false);
      return; // a failed reply is shown, not kept in the conversation
    }
  }
  controller = null;
  if (reply.reasoning_content) b.details.open = false;
  if (note) {
    reply.note = note;
    b.div.querySelector(".role").textContent += " · " + note;
  }
  messages.push(reply);
  save();
  setBusy(false);
}

function send() {
  const text = els.input.value.trim();
  if (!text || controller) return;
  els.input.value = "";
  const m = { role: "user", content: text };
  messages.push(m);
  save();
  showMessage(m);
  complete();
}

els.send.form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
els.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
els.stop.addEventListener("click", () => controller && controller.abort());
els.regenerate.addEventListener("click", () => {
  if (controller || !messages.length || messages[messages.length - 1].role !== "assistant") return;
  messages.pop();
  save();
  render();
  complete();
});
els.newChat.addEventListener("click", () => {
  if (controller) controller.abort();
  messages = [];
  save();
  render();
  els.status.textContent = "";
});
for (const [el, key] of [[els.temperature, "temperature"], [els.thinking, "thinking"],
                         [els.maxTokens, "maxTokens"], [els.apiKey, "apiKey"]]) {
  el.value = store.get(key, el.value);
  el.addEventListener("change", () => { store.set(key, el.value); if (key === "apiKey") loadModel(); });
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    els.model.textContent = r.ok ? body.data[0].id : "(API key needed)";
  } catch { els.model.textContent = ""; }
}

render();
loadModel();
