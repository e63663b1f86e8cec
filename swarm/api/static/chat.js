// The chat page: OpenAI-style streaming from /v1/chat/completions, read with fetch's body reader
// (EventSource cannot POST). The last chunk carries a "molink" field: the route and the speed.
"use strict";
const $ = (id) => document.getElementById(id);
let modelId = null;
let history = [];  // the conversation so far, resent each turn (the server keeps no state)
let busy = false;

async function loadModel() {
  try {
    const r = await fetch("/v1/models");
    const body = await r.json();
    modelId = body.data[0].id;
    $("model").textContent = `model: ${modelId} · context ${body.data[0].context_length ?? "?"} tokens`;
  } catch (e) {
    $("model").textContent = "API unreachable";
  }
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("log").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function describe(meta, tokens) {
  const hops = (meta.route || []).map((h) =>
    `<span class="hop" title="${esc(h.peer_id)}">${esc(h.peer_id.slice(-8))}[${Number(h.start)}:${Number(h.end)})</span>`);
  const speed = meta.tokens_per_second ? `${meta.tokens_per_second.toFixed(1)} tokens/s` : "";
  const first = meta.time_to_first_token_ms != null ? `first token ${Math.round(meta.time_to_first_token_ms)} ms` : "";
  const route = hops.length ? `served by ${hops.join(" → ")}` : "served in-process";
  return [route, `${tokens} tokens`, speed, first].filter(Boolean).join(" · ");
}

function errorText(body, status) {
  return (body && body.error && body.error.message) || `HTTP ${status}`;
}

async function send(text) {
  busy = true;
  $("send").disabled = true;
  history.push({role: "user", content: text});
  bubble("user", text);
  const answer = bubble("assistant", "");
  const out = answer.querySelector(".text");
  let chunks = 0, tokens = 0, finished = false;
  setStatus("streaming", "waiting for the swarm…");
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: {"content-type": "application/json"},
      body: JSON.stringify({model: modelId, messages: history, stream: true,
                            stream_options: {include_usage: true},
                            max_tokens: Number($("max-tokens").value) || 128,
                            temperature: Number($("temperature").value)}),
    });
    if (!resp.ok) {
      let body = null;
      try { body = await resp.json(); } catch (e) { /* not JSON */ }
      throw new Error(errorText(body, resp.status));
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    while (!finished) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") { finished = true; break; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        const choice = (chunk.choices || [])[0];
        if (choice && choice.delta && choice.delta.content) {
          out.textContent += choice.delta.content;
          chunks += 1;
          answer.dataset.chunks = String(chunks);
          setStatus("streaming", `streaming… ${chunks} pieces`);
        }
        if (chunk.molink) answer.dataset.meta = JSON.stringify(chunk.molink);
      }
    }
    history.push({role: "assistant", content: out.textContent});
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.innerHTML = describe(JSON.parse(answer.dataset.meta || "{}"), tokens || chunks);
    answer.appendChild(meta);
    setStatus("done", "done");
  } catch (e) {
    const err = document.createElement("span");
    err.className = "meta error";
    err.textContent = `error: ${e.message}`;
    answer.appendChild(err);
    history.pop();  // the question was not answered: do not send it again as context
    setStatus("error", `error: ${e.message}`);
  } finally {
    busy = false;
    $("send").disabled = false;
    answer.scrollIntoView({block: "end"});
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || busy) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("reset").addEventListener("click", () => { history = []; $("log").innerHTML = ""; setStatus("idle", ""); });
loadModel();
