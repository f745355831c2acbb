"""The web chat served at ``/``: one self-contained page (inline CSS and JS, no CDN, no build step).

It talks to this server's own ``/v1/chat/completions`` with ``stream: true``, appends tokens as their
events arrive, and shows under each answer the servers it went through (the ``corolla.route`` field of
the stream's chunks) and the speed (tokens/s measured by the page, then the server's own figure).
"""

from __future__ import annotations

import html
import json


def chat_page(model_id: str, api_key_required: bool) -> str:
    config = json.dumps({"model": model_id, "keyRequired": api_key_required}).replace("</", "<\\/")
    return _PAGE.replace("__TITLE__", html.escape(model_id)).replace("__CONFIG__", config)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>corolla chat: __TITLE__</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f6f6f3; color: #222; }
  header { padding: 10px 16px; background: #2f4a3a; color: #fff; display: flex; gap: 16px; align-items: center; }
  header h1 { font-size: 17px; margin: 0; font-weight: 600; }
  header .model { opacity: .8; font-family: monospace; overflow: hidden; text-overflow: ellipsis; }
  main { max-width: 860px; margin: 0 auto; padding: 12px 16px 180px; }
  .msg { margin: 10px 0; padding: 10px 12px; border-radius: 8px; white-space: pre-wrap; word-wrap: break-word; }
  .user { background: #dfe9f5; margin-left: 15%; }
  .assistant { background: #fff; border: 1px solid #ddd; margin-right: 15%; }
  .meta { font-size: 12px; color: #666; margin-top: 6px; white-space: normal; font-family: monospace; }
  .error { background: #fbe3e3; border: 1px solid #e5a3a3; }
  form { position: fixed; bottom: 0; left: 0; right: 0; background: #fff; border-top: 1px solid #ccc; padding: 10px 16px; }
  .row { max-width: 860px; margin: 0 auto; display: flex; gap: 8px; align-items: flex-end; }
  textarea { flex: 1; font: inherit; padding: 8px; min-height: 44px; resize: vertical; }
  button { font: inherit; padding: 9px 18px; background: #2f4a3a; color: #fff; border: 0; border-radius: 6px; cursor: pointer; }
  button:disabled { opacity: .5; cursor: default; }
  .settings { max-width: 860px; margin: 6px auto 0; font-size: 13px; color: #555; display: flex; gap: 14px; flex-wrap: wrap; }
  .settings input { width: 70px; }
  .settings input#api-key { width: 180px; }
</style></head>
<body>
<header><h1>corolla chat</h1><span class="model" id="model-name"></span></header>
<main id="messages"></main>
<form id="chat-form">
  <div class="row"><textarea id="prompt" placeholder="Type a message (Enter sends, Shift+Enter: new line)"></textarea>
  <button id="send" type="submit">Send</button></div>
  <div class="settings">
    <label>max tokens <input id="max-tokens" type="number" min="1" value="128"></label>
    <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
    <label id="key-label">API key <input id="api-key" type="password" autocomplete="off"></label>
    <button id="clear" type="button">New chat</button>
  </div>
</form>
<script>
const CONFIG = __CONFIG__;
const $ = (id) => document.getElementById(id);
const conversation = [];
$("model-name").textContent = CONFIG.model;
if (!CONFIG.keyRequired) $("key-label").style.display = "none";
$("api-key").value = localStorage.getItem("corolla-api-key") || "";

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function routeText(route) {
  return (route || []).map((h) => "[" + h.start + ":" + h.end + ") " + h.name).join(" \\u2192 ");
}

async function send(question) {
  conversation.push({role: "user", content: question});
  bubble("user", question);
  const answer = bubble("assistant", "");
  const content = answer.querySelector(".content");
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = "waiting for the swarm\\u2026";
  answer.appendChild(meta);
  const key = $("api-key").value.trim();
  localStorage.setItem("corolla-api-key", key);
  const headers = {"Content-Type": "application/json"};
  if (key) headers["Authorization"] = "Bearer " + key;
  const body = {
    model: CONFIG.model, messages: conversation, stream: true, stream_options: {include_usage: true},
    max_tokens: parseInt($("max-tokens").value, 10) || 128,
    temperature: parseFloat($("temperature").value) || 0,
  };
  const started = performance.now();
  let first = null, tokens = 0, route = [], text = "";
  try {
    const res = await fetch("/v1/chat/completions", {method: "POST", headers, body: JSON.stringify(body)});
    if (!res.ok) {
      const err = await res.json().catch(() => ({error: {message: res.statusText}}));
      throw new Error(res.status + ": " + err.error.message);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.corolla && chunk.corolla.route) route = chunk.corolla.route;
        for (const choice of chunk.choices || []) {
          const piece = (choice.delta || {}).content;
          if (piece) {
            if (first === null) first = performance.now();
            tokens += 1;
            text += piece;
            content.textContent = text;
            content.dataset.updates = String(tokens);  // how many times the answer grew (tests read it)
          }
        }
        const secs = first === null ? 0 : (performance.now() - first) / 1000;
        const rate = secs > 0 ? (tokens - 1) / secs : 0;
        meta.textContent = "via " + (routeText(route) || "?") + " \\u00b7 " + tokens + " tokens \\u00b7 " + rate.toFixed(1) + " tokens/s";
        if (chunk.corolla && chunk.corolla.tokens_per_second !== undefined) {
          const c = chunk.corolla;
          const used = chunk.usage ? chunk.usage.completion_tokens : tokens;
          meta.textContent = "via " + routeText(c.route) + (c.failovers ? " (" + c.failovers + " failover)" : "") +
            " \\u00b7 " + used + " tokens \\u00b7 " + c.tokens_per_second.toFixed(1) + " tokens/s \\u00b7 first token after " +
            c.time_to_first_token.toFixed(2) + " s";
          meta.dataset.done = "1";
        }
        answer.scrollIntoView({block: "end"});
      }
    }
    conversation.push({role: "assistant", content: text});
  } catch (e) {
    answer.classList.add("error");
    meta.textContent = "error: " + e.message;
    meta.dataset.done = "1";
    conversation.pop();
  }
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = "";
  $("send").disabled = true;
  try { await send(text); } finally { $("send").disabled = false; $("prompt").focus(); }
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
});
$("clear").addEventListener("click", () => { conversation.length = 0; $("messages").innerHTML = ""; });
</script>
</body></html>
"""
