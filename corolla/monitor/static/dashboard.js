// corolla monitor: polls /api/v1/state and redraws every model.
// Every string from the swarm (server names, versions, adapters) goes into the page as text, never as HTML.
// Elements carry data-* attributes (data-coverage, data-state, data-server-name, ...) that tests and users' scripts read.
"use strict";

const STATE_URL = "/api/v1/state";
const DEFAULT_REFRESH_S = 2;
let lastGood = null; // the last state read, kept on screen (marked stale) when a poll fails

// columns of the server table: [header, value from a server entry, numeric?]
const COLUMNS = [
  ["server", (s) => s.name],
  ["peer id", (s) => "…" + s.peer_id.slice(-8)],
  ["blocks", (s) => `[${s.info.start}:${s.info.end})`],
  ["state", (s) => s.info.state],
  ["tok/s", (s) => fixed(s.info.throughput, 1), true],
  ["ms/blk", (s) => fixed(s.info.inference_latency * 1000, 1), true],
  ["free cache", (s) => String(s.info.free_cache_tokens), true],
  ["max length", (s) => String(s.info.inference_max_length), true],
  ["max batch", (s) => String(s.info.max_batch_size), true],
  ["version", (s) => s.info.software_version || "?"],
  ["wire", (s) => String(s.info.wire_version)],
  ["dtype", (s) => s.info.torch_dtype],
  ["quant", (s) => s.info.quantization],
  ["adapters", (s) => (s.info.adapters || []).join(", ") || "-"],
  ["conn", (s) => (s.info.relayed ? "relayed" : "direct")],
  ["config", (s) => (s.info.config_hash || "?").slice(0, 10)],
  ["next RTTs", (s) => (s.info.next_rtts || []).map(([p, t]) => `…${String(p).slice(-6)} ${fixed(t * 1000, 1)} ms`).join(", ") || "-"],
  // clients that reported this server returning wrong activations (how many had a majority against it)
  ["reported", (s) => (s.tamper_reports ? `${s.tamper_reports.reporters} (${s.tamper_reports.confirmed} confirmed)` : "-")],
];
// record fields the columns above already show; any other field gets a generic column
const SHOWN = new Set(["state", "start", "end", "public_name", "throughput", "inference_latency", "free_cache_tokens",
  "inference_max_length", "max_batch_size", "software_version", "wire_version", "torch_dtype", "quantization", "adapters", "relayed",
  "config_hash", "next_rtts"]);

function fixed(x, digits) {
  return typeof x === "number" ? x.toFixed(digits) : "?";
}

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

function ranges(blocks) {
  // [0,1,2,5] -> "0-2, 5"
  const parts = [];
  for (let i = 0; i < blocks.length; i++) {
    let j = i;
    while (j + 1 < blocks.length && blocks[j + 1] === blocks[j] + 1) j++;
    parts.push(i === j ? `${blocks[i]}` : `${blocks[i]}-${blocks[j]}`);
    i = j;
  }
  return parts.join(", ");
}

function row(labelText, track) {
  return [el("span", { class: "label", title: labelText }, labelText), track];
}

function axisRow(numBlocks) {
  const track = el("div", { class: "track" });
  const step = Math.max(1, Math.ceil(numBlocks / 32)); // at most ~32 tick labels
  for (let b = 0; b < numBlocks; b++) track.append(el("span", { class: "tick" }, b % step === 0 ? String(b) : ""));
  const wrapper = el("div", { class: "axis", style: "display: contents" });
  wrapper.append(el("span", { class: "label" }, "block"), track);
  return wrapper;
}

function coverageRow(model) {
  const track = el("div", { class: "track coverage" });
  for (const block of model.blocks) {
    const title = `block ${block.index}: ${block.online} online` +
      (block.joining ? `, ${block.joining} joining` : "") + (block.offline ? `, ${block.offline} offline` : "") +
      `, ${fixed(block.throughput, 1)} tok/s`;
    track.append(el("div", { class: "cell", "data-block": block.index, "data-coverage": block.online, title }));
  }
  return row("coverage", track);
}

function serverRow(model, server) {
  const info = server.info;
  const track = el("div", { class: "track server-track" });
  const start = Math.max(0, Math.min(info.start, model.num_blocks));
  const end = Math.max(start, Math.min(info.end, model.num_blocks));
  const bar = el("div", {
    class: `bar state-${info.state}`,
    "data-state": info.state,
    "data-server-name": server.name,
    "data-peer-id": server.peer_id,
    "data-start": info.start,
    "data-end": info.end,
    style: `grid-column: ${start + 1} / ${end + 1}`,
    title: `${server.name} [${info.start}:${info.end}) ${info.state}, ${fixed(info.throughput, 1)} tok/s`,
  }, `${server.name} [${info.start}:${info.end}) ${info.state}`);
  if (end > start) track.append(bar);
  return row(server.name, track);
}

function serverTable(servers) {
  const extra = [];
  for (const s of servers) for (const key of Object.keys(s.info)) if (!SHOWN.has(key) && !extra.includes(key)) extra.push(key);
  const columns = COLUMNS.concat(extra.map((key) => [key, (s) => JSON.stringify(s.info[key])]));
  const table = el("table", { class: "servers" });
  const head = el("tr");
  for (const [name] of columns) head.append(el("th", {}, name));
  const thead = el("thead");
  thead.append(head);
  table.append(thead);
  const body = el("tbody");
  for (const s of servers) {
    const tr = el("tr", { "data-server-name": s.name, "data-peer-id": s.peer_id, "data-state": s.info.state });
    for (const [name, value, numeric] of columns) {
      const attrs = numeric ? { class: "num" } : name === "state" ? { class: `state-text text-${s.info.state}` } : {};
      tr.append(el("td", attrs, value(s)));
    }
    body.append(tr);
  }
  table.append(body);
  return table;
}

function modelSection(model) {
  const section = el("section", {
    class: "model",
    "data-model": model.dht_prefix,
    "data-num-blocks": model.num_blocks,
    "data-gaps": model.gaps.join(","),
    "data-fully-covered": model.fully_covered,
  });
  const title = el("h2", {}, model.dht_prefix);
  title.append(el("span", { class: "summary" },
    `${model.num_blocks} blocks${model.num_blocks_inferred ? " (count inferred from the records)" : ""} · ` +
    `${model.num_servers} servers (${model.num_online} online) · ` +
    `bottleneck ${fixed(model.bottleneck_throughput, 1)} tok/s`));
  section.append(title);

  const grid = el("div", { class: "grid", style: `--blocks: ${Math.max(1, model.num_blocks)}` });
  grid.append(axisRow(model.num_blocks));
  grid.append(...coverageRow(model));
  for (const server of model.servers) grid.append(...serverRow(model, server));
  section.append(grid);

  if (model.gaps.length) {
    section.append(el("p", { class: "gap-note" }, `No online server for blocks ${ranges(model.gaps)}: the model cannot run until they are served.`));
  } else if (model.num_blocks) {
    const single = model.single_server_blocks.length ? `; one server only for blocks ${ranges(model.single_server_blocks)}` : "";
    section.append(el("p", { class: "ok-note" }, `Every block is served${single}.`));
  }
  if (model.servers.length) {
    const scroller = el("div", { class: "table-scroll" });
    scroller.append(serverTable(model.servers));
    section.append(scroller);
  }
  else section.append(el("p", { class: "empty" }, "No server records under this prefix."));
  return section;
}

function setStatus(kind, text) {
  const status = document.getElementById("status");
  status.setAttribute("data-status", kind);
  status.textContent = text;
}

function drawSwarm(swarm) {
  const line = document.getElementById("swarm");
  if (!swarm) return;
  line.setAttribute("data-private", String(swarm.private));
  let text = swarm.private
    ? `private swarm (key ${swarm.key}): only members can call its servers and read its records`
    : "OPEN swarm: anyone who reaches a peer can join, read these records and call these servers";
  const ignored = Object.entries(swarm.ignored_records || {});
  if (ignored.length) {
    const total = ignored.reduce((sum, [, n]) => sum + n, 0);
    text += `; ignored ${total} invalid record(s): ` + ignored.map(([reason, n]) => `${reason} ${n}`).join(", ");
  }
  line.textContent = text;
}

function draw(state) {
  drawSwarm(state.swarm);
  const container = document.getElementById("models");
  container.replaceChildren(...state.models.map(modelSection));
  if (state.updated_at === null) {
    setStatus("loading", state.error ? `first DHT read failed: ${state.error}` : "waiting for the first DHT read…");
    return;
  }
  const when = new Date(state.updated_at * 1000).toLocaleTimeString();
  const age = Math.max(0, state.served_at - state.updated_at);
  if (state.error) setStatus("stale", `DHT read failing (${state.error}); showing the state read at ${when}`);
  else setStatus("ok", `read from the DHT at ${when} (${age.toFixed(1)} s ago), every ${state.refresh_seconds} s`);
  document.body.setAttribute("data-updated-at", String(state.updated_at));
}

async function poll() {
  let refresh = lastGood ? lastGood.refresh_seconds : DEFAULT_REFRESH_S;
  let state = null;
  try {
    const response = await fetch(STATE_URL, { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    state = await response.json();
  } catch (err) {
    setStatus("error", `cannot reach the monitor (${err.message}); retrying`);
  }
  if (state !== null) {
    lastGood = state;
    refresh = state.refresh_seconds || DEFAULT_REFRESH_S;
    try {
      draw(state);
    } catch (err) {
      setStatus("error", `cannot draw the state (${err.message}); see the browser console`);
      console.error(err);
    }
  }
  setTimeout(poll, refresh * 1000);
}

poll();
