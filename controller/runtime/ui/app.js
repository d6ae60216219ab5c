// Kiln console: three pages over /kiln/v1/console/* and its event stream. No framework, no build step; plots are
// inline SVG. Every value that came from the server goes into the page through esc() or textContent.
"use strict";

const STATE_LABEL = {
  "free": "free", "busy": "busy", "idle-warm": "idle-warm", "loading": "loading", "rented": "rented",
  "lent": "lent", "cordoned": "cordoned", "unhealthy": "unhealthy", "offline": "offline",
};
const DETAIL_LIMIT = 16; // nodes up to which the fleet is a table with every GPU's figures
const HISTORY = 300; // seconds of client-side history per deployment

const model = { fleet: null, deployments: [], rentals: null, history: {}, who: null };

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function $(id) { return document.getElementById(id); }
function fmtS(s) {
  if (s == null) return "–";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}
function fmtTime(epochS) { return epochS == null ? "–" : new Date(epochS * 1000).toISOString().replace("T", " ").slice(0, 16) + "Z"; }

async function getJSON(path) {
  const r = await fetch(path, { credentials: "same-origin" });
  if (r.status === 401) throw Object.assign(new Error("unauthorized"), { status: 401 });
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

// ---- pages -------------------------------------------------------------------------------------------------------

function showPage() {
  const page = (location.hash || "#fleet").slice(1);
  for (const el of document.querySelectorAll(".page")) el.hidden = el.id !== "page-" + page;
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.page === page);
}

// A GPU of `node` at position `pos`: its cell is [state, util, memMiB, powerW, tempC, xid, holder].
function cell(node, pos) {
  const c = node.gpus[pos];
  const index = node.index ? node.index[pos] : pos;
  return { state: model.fleet.states[c[0]], util: c[1], mem: c[2], power: c[3], temp: c[4], xid: c[5], holder: c[6], index };
}
function memOf(node) { return model.fleet.models[node.model]?.memMiB || 0; }

function gpuTitle(node, g) {
  let t = `${node.name} GPU ${g.index}: ${g.state}`;
  if (g.holder) t += ` (${g.holder})`;
  if (g.xid) t += ` Xid ${g.xid}`;
  return t + `\nutil ${g.util}%  mem ${(g.mem / 1024).toFixed(1)} GiB  ${g.power} W  ${g.temp} °C`;
}

function gpuRow(n, node, pos) {
  const g = cell(node, pos);
  const mem = memOf(node);
  const memPct = mem ? Math.min(100, (100 * g.mem) / mem) : 0;
  const state = g.state === "unhealthy" && g.xid ? `unhealthy · Xid ${g.xid}` : g.state;
  return `<tr id="g-${n}-${pos}"><td>${esc(node.name)}</td><td class="num">${g.index}</td>` +
    `<td><span class="badge s-${esc(g.state)}">${esc(state)}</span></td><td>${esc(g.holder)}</td>` +
    `<td><span class="bar"><i style="width:${g.util}%"></i></span>${g.util}%</td>` +
    `<td><span class="bar"><i style="width:${memPct.toFixed(0)}%"></i></span>${(g.mem / 1024).toFixed(1)} / ${(mem / 1024).toFixed(0)} GiB</td>` +
    `<td class="num">${g.power} W</td><td class="num">${g.temp} °C</td></tr>`;
}

function renderFleet() {
  const f = model.fleet;
  const el = $("page-fleet");
  if (!f) { el.innerHTML = "<p class=muted>loading…</p>"; return; }
  const total = f.nodes.reduce((a, n) => a + n.gpus.length, 0);
  let html = `<h1>Fleet <span class="muted">${f.nodes.length} node(s), ${total} GPU(s)</span></h1><div class="cards">`;
  for (const s of f.states) {
    html += `<div class="card stat"><span class="badge s-${s}">${STATE_LABEL[s]}</span><b id="count-${s}">${f.counts[s] || 0}</b></div>`;
  }
  html += "</div>";
  if (f.nodes.length <= DETAIL_LIMIT) {
    html += "<h2>GPUs</h2><table id=gpus><thead><tr><th>node</th><th>GPU</th><th>state</th><th>held by</th>" +
      "<th>utilisation</th><th>memory</th><th>power</th><th>temp</th></tr></thead><tbody>";
    f.nodes.forEach((node, n) => { node.gpus.forEach((_, pos) => { html += gpuRow(n, node, pos); }); });
    html += "</tbody></table>";
  } else {
    html += `<h2>GPU grid</h2><p class="legend">${f.states.map((s) => `<span><i class="s-${s}"></i>${s}</span>`).join("")}</p><div class="grid" id="grid">`;
    // One element per GPU, coloured by state; its figures are read on hover (8,000 titles would slow the render).
    const parts = [];
    f.nodes.forEach((node, n) => {
      parts.push(`<div class="node${node.ready ? "" : " down"}">`);
      for (let pos = 0; pos < node.gpus.length; pos++) parts.push(`<i class="gpu s-${f.states[node.gpus[pos][0]]}" id="g-${n}-${pos}"></i>`);
      parts.push("</div>");
    });
    html += parts.join("") + '</div><p id="hover" class="muted"></p>';
  }
  const withCache = f.nodes.filter((n) => Object.keys(n.cache || {}).length);
  if (withCache.length && withCache.length <= 50) {
    html += "<h2>Cached weights</h2><table><thead><tr><th>node</th><th>GPU memory</th><th>host RAM</th><th>disk</th></tr></thead><tbody>";
    for (const n of withCache) {
      const t = (k) => (n.cache[k] || []).map((u) => esc(u.split("/").pop())).join(", ") || "–";
      html += `<tr><td>${esc(n.name)}${n.cordoned ? " <span class='badge s-cordoned'>cordoned</span>" : ""}</td><td>${t("gpu")}</td><td>${t("host")}</td><td>${t("disk")}</td></tr>`;
    }
    html += "</tbody></table>";
  } else if (withCache.length) {
    html += `<p class="muted">${withCache.length} node(s) hold cached weights.</p>`;
  }
  el.innerHTML = html;
  const grid = $("grid");
  if (grid) grid.addEventListener("mouseover", (ev) => {
    const m = /^g-(\d+)-(\d+)$/.exec(ev.target.id || "");
    if (!m) return;
    const node = model.fleet.nodes[+m[1]];
    if (node) { ev.target.title = gpuTitle(node, cell(node, +m[2])); $("hover").textContent = ev.target.title; }
  });
}

function applyDelta(d) {
  const f = model.fleet;
  if (!f) return;
  const detail = f.nodes.length <= DETAIL_LIMIT;
  for (const c of d.g) {
    const [n, pos, ...raw] = c;
    const node = f.nodes[n];
    if (!node || pos >= node.gpus.length) continue;
    const old = f.states[node.gpus[pos][0]];
    node.gpus[pos] = raw;
    const state = f.states[raw[0]];
    f.counts[old] = (f.counts[old] || 1) - 1;
    f.counts[state] = (f.counts[state] || 0) + 1;
    const el = $(`g-${n}-${pos}`);
    if (!el) continue;
    if (detail) el.outerHTML = gpuRow(n, node, pos);
    else if (old !== state) el.className = "gpu s-" + state;
  }
  for (const s of f.states) { const e = $("count-" + s); if (e) e.textContent = f.counts[s] || 0; }
}

// A small SVG line chart of [t, v] points over the last HISTORY seconds.
function sparkline(points, label, unit) {
  const w = 260, h = 60;
  if (points.length < 2) return `<svg width="${w}" height="${h}"><rect width="${w}" height="${h}" fill="#fbfbfc" stroke="#e2e5ea"/><text x="4" y="12">${esc(label)}: collecting…</text></svg>`;
  const t1 = points[points.length - 1][0], t0 = t1 - HISTORY;
  const max = Math.max(...points.map((p) => p[1]), 1e-9);
  const xy = points.map((p) => `${(((p[0] - t0) / HISTORY) * w).toFixed(1)},${(h - 4 - (p[1] / max) * (h - 20)).toFixed(1)}`);
  const last = points[points.length - 1][1];
  return `<svg width="${w}" height="${h}" role="img" aria-label="${esc(label)}"><rect width="${w}" height="${h}" fill="#fbfbfc" stroke="#e2e5ea"/>` +
    `<polyline fill="none" stroke="#4c6ef5" stroke-width="1.5" points="${xy.join(" ")}"/>` +
    `<text x="4" y="12">${esc(label)}: ${last.toFixed(2)} ${esc(unit)} (max ${max.toFixed(2)})</text></svg>`;
}

// A horizontal stacked bar of named parts.
function stacked(parts, colors, unit) {
  const total = parts.reduce((a, p) => a + p[1], 0);
  if (!total) return "<span class=muted>–</span>";
  const w = 320;
  let x = 0, svg = `<svg width="${w}" height="14">`;
  parts.forEach((p, i) => {
    const pw = (p[1] / total) * w;
    svg += `<rect x="${x.toFixed(1)}" y="0" width="${pw.toFixed(1)}" height="14" fill="${colors[i % colors.length]}"><title>${esc(p[0])}: ${p[1].toFixed(2)} ${unit}</title></rect>`;
    x += pw;
  });
  svg += "</svg>";
  const fmt = (v) => (v >= 100 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(2));
  return svg + '<div class="tiers">' + parts.map((p, i) => `<i style="display:inline-block;width:.8em;height:.8em;background:${colors[i % colors.length]}"></i> ${esc(p[0])} ${fmt(p[1])}${unit}`).join(" &nbsp; ") + "</div>";
}

function recordHistory(deps) {
  const now = Date.now() / 1000;
  for (const d of deps) {
    const h = (model.history[d.name] ||= { last: null, rate: [], errors: [], queue: [], p95: [] });
    if (h.last) {
      const dt = now - h.last.t;
      if (dt > 0.2) {
        h.rate.push([now, Math.max(0, d.requests - h.last.requests) / dt]);
        h.errors.push([now, Math.max(0, d.failed - h.last.failed) / dt]);
      }
    }
    h.queue.push([now, d.waiting]);
    if (d.latency.p95 != null) h.p95.push([now, d.latency.p95]);
    h.last = { t: now, requests: d.requests, failed: d.failed };
    for (const k of ["rate", "errors", "queue", "p95"]) while (h[k].length && h[k][0][0] < now - HISTORY) h[k].shift();
  }
}

function renderDeployments() {
  const el = $("page-deployments");
  const deps = model.deployments;
  let html = `<h1>Deployments <span class="muted">${deps.length}</span></h1>`;
  if (!deps.length) { el.innerHTML = html + "<p class=muted>No deployments visible to this key.</p>"; return; }
  html += "<table id=deployments><thead><tr><th>deployment</th><th>requests</th><th>errors</th><th>p50</th><th>p95</th><th>p99</th>" +
    "<th>queue</th><th>replicas desired / ready / loading</th><th>cold starts</th><th>keep-alive</th></tr></thead><tbody>";
  for (const d of deps) {
    const r = d.replicas;
    const keep = d.keepAlive ? (d.keepAlive.releaseInS == null ? "kept" : `release in ${fmtS(d.keepAlive.releaseInS)}`) : "serving";
    html += `<tr data-name="${esc(d.name)}"><td>${esc(d.name)}</td><td class="num requests">${d.requests}</td><td class="num">${d.failed}</td>` +
      `<td class="num">${fmtS(d.latency.p50)}</td><td class="num">${fmtS(d.latency.p95)}</td><td class="num">${fmtS(d.latency.p99)}</td>` +
      `<td class="num">${d.waiting}</td><td class="num">${r.desired} / ${r.ready} / ${r.loading}</td><td class="num coldstarts">${d.coldStarts}</td><td>${esc(keep)}</td></tr>`;
  }
  html += "</tbody></table>";
  for (const d of deps) {
    const h = model.history[d.name] || { rate: [], errors: [], queue: [], p95: [] };
    html += `<div class="card dep"><h3>${esc(d.name)}</h3><div class="cards">` +
      sparkline(h.rate, "requests/s", "/s") + sparkline(h.errors, "errors/s", "/s") + sparkline(h.queue, "queue", "") + sparkline(h.p95, "p95", "s") + "</div>";
    html += '<div class="kv" style="margin-top:.6em">';
    const c = d.lastColdStart;
    if (c) {
      const p = c.phasesMs;
      html += `<span class="muted">last cold start</span><span>${fmtS(c.seconds)} on ${esc(c.node)} from ${esc(c.source || "?")}, ${fmtTime(c.at)}<br>` +
        stacked([["fetch", p.fetch], ["read", p.read], ["host→GPU", p.hostToDevice], ["init", p.init]], ["#74c0fc", "#4dabf7", "#228be6", "#1864ab"], " ms") + "</span>";
    } else {
      html += '<span class="muted">last cold start</span><span>none yet</span>';
    }
    const k = d.keepAlive;
    html += `<span class="muted">keep-alive</span><span>${k ? `idle ${fmtS(k.idleForS)}; ${k.releaseInS == null ? "kept" : "release in " + fmtS(k.releaseInS)}` +
      (k.prewarmInS != null ? `; pre-warm in ${fmtS(k.prewarmInS)}` : "") + ` — ${esc(k.why)}` : "requests in flight or waiting: replicas stay"}</span>`;
    const gs = Object.entries(d.gpuSeconds || {});
    html += `<span class="muted">GPU-seconds by phase</span><span>${gs.length ? stacked(gs, ["#2f9e44", "#94d82d", "#f59f00", "#4263eb"], " s") : "<span class=muted>none metered yet (one-minute windows)</span>"}</span>`;
    if (d.unschedulable) html += `<span class="muted">unschedulable</span><span class="error">${esc(d.unschedulable)}</span>`;
    if (d.degraded) html += `<span class="muted">degraded</span><span class="error">${esc(d.degraded)}</span>`;
    html += "</div></div>";
  }
  el.innerHTML = html;
}

function renderRentals() {
  const el = $("page-rentals");
  const r = model.rentals;
  if (!r) { el.innerHTML = "<p class=muted>loading…</p>"; return; }
  let html = "<h1>Rentals</h1>";
  if (!r.rentals.length) {
    html += "<p class=muted>No rentals visible to this key.</p>";
  } else {
    const now = Date.now() / 1000;
    const starts = r.rentals.map((x) => x.deliveredAt ?? now), ends = r.rentals.map((x) => x.endAt ?? now + 3600);
    const t0 = Math.min(now, ...starts), t1 = Math.max(now + 60, ...ends), w = 360;
    const X = (t) => (((t - t0) / (t1 - t0)) * w).toFixed(1);
    html += "<table id=rentals><thead><tr><th>rental</th><th>phase</th><th>GPUs</th><th>delivered</th><th>ends</th><th>calendar</th><th>GPU-hours billed</th><th></th></tr></thead><tbody>";
    for (const x of r.rentals) {
      const a = x.deliveredAt ?? now, b = x.endAt ?? t1;
      const color = x.lent ? "var(--lent)" : x.phase === "Active" ? "var(--rented)" : "#adb5bd";
      const bar = `<svg width="${w}" height="14"><rect width="${w}" height="14" fill="#f1f3f5"/><rect x="${X(a)}" width="${Math.max(2, X(b) - X(a))}" height="14" fill="${color}"/><line x1="${X(now)}" x2="${X(now)}" y1="0" y2="14" stroke="#e03131"/></svg>`;
      const flags = [x.expiringSoon ? "expiring soon" : "", x.lent ? "lent" : "", x.degraded ? "degraded" : ""].filter(Boolean).join(", ");
      html += `<tr><td>${esc(x.name)}</td><td>${esc(x.phase)}<div class="tiers">${esc(x.message)}</div></td><td>${x.count} × ${esc(x.gpuModel)}<div class="tiers">${esc(x.gpus.join(" "))}</div></td>` +
        `<td>${fmtTime(x.deliveredAt)}</td><td>${fmtTime(x.endAt)}</td><td>${bar}</td><td class="num">${x.billedGpuHours}</td><td>${esc(flags)}</td></tr>`;
    }
    html += "</tbody></table>";
  }
  html += "<h1 style='margin-top:1em'>Usage</h1>";
  const u = r.usage;
  if (!u) html += "<p class=muted>Billing is off (no prices configured).</p>";
  else if (u.error) html += `<p class=error>${esc(u.error)}</p>`;
  else {
    html += `<table id=usage><thead><tr><th>${esc(u.by)}</th><th>GPU-seconds</th><th>rental GPU-hours</th><th>amount (${esc(u.currency)})</th></tr></thead><tbody>`;
    for (const g of u.groups) html += `<tr><td>${esc(g.key)}</td><td class="num">${g.gpuSeconds.toFixed(1)}</td><td class="num">${g.gpuHours}</td><td class="num">${esc(g.amount)}</td></tr>`;
    html += `<tr><th>total</th><th class="num">${u.total.gpuSeconds.toFixed(1)}</th><th class="num">${u.total.gpuHours}</th><th class="num">${esc(u.total.amount)}</th></tr></tbody></table>`;
  }
  el.innerHTML = html;
}

// ---- start -------------------------------------------------------------------------------------------------------

function needLogin() {
  $("login").hidden = false;
  for (const el of document.querySelectorAll(".page")) el.hidden = true;
  document.body.dataset.state = "login";
}

async function start() {
  let who;
  try { who = await getJSON("/kiln/v1/console/whoami"); } catch (e) { if (e.status === 401) return needLogin(); throw e; }
  model.who = who;
  const steps = { whoami: performance.now() };
  $("who").textContent = who.operator ? "operator" : "namespace " + who.namespace;
  $("logout").hidden = false;
  showPage();
  renderFleet();
  // The fleet and the deployments come from the event stream (a snapshot first, then deltas): one fleet
  // computation per page load, not two.
  const ready = () => {
    if (model.fleet && model.deployments && model.rentals && document.body.dataset.state !== "ready") {
      document.body.dataset.state = "ready";
      // Navigation start to the first render, and its steps (kiln bench console reads them).
      window.kilnReadyMs = performance.now();
      window.kilnSteps = steps;
    }
  };
  model.deployments = null;
  const es = new EventSource("/kiln/v1/console/events");
  es.onopen = () => $("live").classList.add("on");
  es.onerror = () => $("live").classList.remove("on");
  es.addEventListener("fleet", (e) => {
    steps.fleetReceived ??= performance.now();
    model.fleet = JSON.parse(e.data);
    renderFleet();
    steps.fleetRendered ??= performance.now();
    ready();
  });
  es.addEventListener("delta", (e) => applyDelta(JSON.parse(e.data)));
  es.addEventListener("deployments", (e) => {
    model.deployments = JSON.parse(e.data).deployments; recordHistory(model.deployments); renderDeployments(); ready();
  });
  const loadRentals = async () => { try { model.rentals = await getJSON("/kiln/v1/console/rentals"); renderRentals(); ready(); } catch (_) {} };
  await loadRentals();
  setInterval(loadRentals, 10000);
  // The plots move every second, whether or not the figures changed.
  setInterval(() => { if (model.deployments) { recordHistory(model.deployments); if (location.hash === "#deployments") renderDeployments(); } }, 1000);
}

// Script errors are kept on the page (the browser test reports them).
window.addEventListener("error", (e) => { document.body.dataset.error = (document.body.dataset.error || "") + e.message + "; "; });
window.addEventListener("hashchange", showPage);
document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const r = await fetch("/ui/login", { method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ key: $("key").value }) });
    if (r.ok) location.replace("/ui"); else $("login-error").textContent = "That key is not known to this gateway.";
  });
  $("logout").addEventListener("click", async () => { await fetch("/ui/logout", { method: "POST", credentials: "same-origin" }); location.replace("/ui"); });
  start().catch((e) => { document.body.dataset.state = "error"; $("page-fleet").innerHTML = `<p class=error>${esc(e.message)}</p>`; $("page-fleet").hidden = false; });
});
