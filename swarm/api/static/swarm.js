// The swarm map: polls /api/swarm every 2 s and redraws. Each poll has its own deadline, so a
// slow server shows as "stale" on the page instead of piling up requests.
"use strict";
const POLL_MS = 2000, TIMEOUT_MS = 8000;
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
let lastOk = 0;

function blocksHtml(model) {
  const cells = model.blocks.map((b) => {
    const n = b.peers.length;
    const title = `block ${b.index}: ${n} peer(s), ${b.throughput.toFixed(0)} block-steps/s`;
    return `<div class="block r${Math.min(n, 3)}" title="${esc(title)}">${b.index}</div>`;
  });
  return `<div class="blocks" style="grid-template-columns: repeat(${Math.min(model.num_blocks, 32)}, 1fr)">${cells.join("")}</div>`;
}

function peerRow(p, numBlocks) {
  const left = (100 * p.start) / numBlocks, width = (100 * (p.end - p.start)) / numBlocks;
  const latency = p.latency_ms == null ? "–" : `${p.latency_ms.toFixed(1)} ms <span class="muted">(${esc(p.latency_source)})</span>`;
  return `<tr data-peer="${esc(p.peer_id)}">
    <td class="mono" title="${esc(p.peer_id)}">${esc(p.short)}</td>
    <td><div class="span"><i style="left:${left}%;width:${width}%"></i></div></td>
    <td>${p.start}:${p.end}</td>
    <td>${p.throughput.toFixed(0)}</td>
    <td>${latency}</td>
    <td>${p.sessions ?? "–"}</td>
    <td>${p.steps ?? "–"}</td>
    <td>${p.free_cache_tokens ?? "–"}</td>
    <td><span class="state ${esc(p.state.replace(" ", "-"))}">${esc(p.state)}</span></td>
    <td title="${esc(p.addrs.join("\n"))}">${esc(p.reachability)}</td>
    <td>${p.expires_in.toFixed(0)} s</td></tr>`;
}

function modelHtml(model, index) {
  const coverage = model.covered
    ? `<p class="coverage ok" id="coverage-${index}">all ${model.num_blocks} blocks covered by ${model.peers.length} peer(s)</p>`
    : `<p class="coverage gaps" id="coverage-${index}">GAPS: no peer serves blocks ${
        model.gaps.map((g) => `${g[0]}:${g[1]}`).join(", ") || "(none announced)"}</p>`;
  const rows = model.peers.map((p) => peerRow(p, model.num_blocks)).join("");
  return `<section class="model-card">
    <h2>${esc(model.id)}</h2>
    <div class="muted mono">key ${esc(model.model_key)}</div>
    ${coverage}${blocksHtml(model)}
    <table><thead><tr><th>peer</th><th>span</th><th>blocks</th><th>block-steps/s</th><th>latency</th>
      <th>sessions</th><th>steps</th><th>free cache</th><th>state</th><th>reach</th><th>expires</th></tr></thead>
      <tbody>${rows}</tbody></table></section>`;
}

async function poll() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  try {
    const resp = await fetch("/api/swarm", {signal: abort.signal, cache: "no-store"});
    const snap = await resp.json();
    $("models").innerHTML = snap.models.map(modelHtml).join("");
    $("error").textContent = snap.error || "";
    const a = snap.api;
    $("api").textContent = `API: ${a.active_requests}/${a.max_concurrent} requests running · ${a.requests} served · ` +
      `${a.tokens} tokens · ${a.rejected} rejected (429) · ${a.timeouts} timed out · ${a.failed} failed`;
    lastOk = Date.now();
  } catch (e) {
    $("error").textContent = `could not refresh: ${e.message}`;
  } finally {
    clearTimeout(timer);
    const age = lastOk ? Math.round((Date.now() - lastOk) / 1000) : null;
    $("updated").textContent = age == null ? "no data yet" : `updated ${age} s ago`;
    setTimeout(poll, POLL_MS);
  }
}
poll();
