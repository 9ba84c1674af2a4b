//! The hub's live status page, served at `/` on the metrics address. One
//! self-contained HTML document (inline CSS, JS and SVG; no external
//! assets) that polls `/status.json` every two seconds and renders the
//! health line, the nodes, the per-table table, throughput, the last 24
//! hours and a lag/throughput chart of the last hour.

/// The page.
pub const INDEX_HTML: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>syncmesh status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
 h1 { font-size: 1.3em; margin: 0 0 .3em; }
 .healthy { color: #17803d; } .degraded { color: #b26a00; } .down { color: #c0262d; }
 table { border-collapse: collapse; margin: .5em 0 1.2em; }
 th, td { border-bottom: 1px solid #ddd; padding: .25em .8em; text-align: left; }
 td.num { text-align: right; font-variant-numeric: tabular-nums; }
 .synced { color: #17803d; } .behind { color: #b26a00; } .error { color: #c0262d; }
 .cards span { display: inline-block; margin-right: 2em; }
 svg { border: 1px solid #ddd; background: #fafafa; }
 .legend-rps { color: #2463eb; } .legend-lag { color: #d9480f; }
 #updated { color: #777; font-size: .9em; }
</style>
</head>
<body>
<h1>syncmesh hub <span id="hub-name">…</span></h1>
<p id="health" class="degraded">loading…</p>
<div class="cards">
 <span>throughput now <b id="tp-now">–</b> rec/s</span>
 <span>average <b id="tp-avg">–</b> rec/s</span>
 <span>peak <b id="tp-peak">–</b> rec/s</span>
</div>
<div class="cards">
 <span>last 24 h: records <b id="records-24h">–</b></span>
 <span>errors <b id="errors-24h">–</b></span>
 <span>conflicts <b id="conflicts-24h">–</b></span>
 <span>ops held <b id="total-ops">–</b></span>
</div>
<h2>Tables</h2>
<table id="tables">
 <thead><tr><th>table</th><th>status</th><th>lag (s)</th><th>records</th><th>errors</th><th>conflicts</th><th>detail</th></tr></thead>
 <tbody></tbody>
</table>
<h2>Nodes</h2>
<table id="nodes">
 <thead><tr><th>node</th><th>state</th><th>engine</th><th>mode</th><th>lag (s)</th><th>pending ops</th><th>last seen</th></tr></thead>
 <tbody></tbody>
</table>
<h2>Last hour</h2>
<p><span class="legend-rps">■ records/s</span> &nbsp; <span class="legend-lag">■ lag (s, right axis)</span></p>
<svg id="chart" width="720" height="200" viewBox="0 0 720 200" role="img" aria-label="throughput and lag over the last hour"></svg>
<p id="updated"></p>
<script>
"use strict";
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function fmt(x, digits) {
  if (x === null || x === undefined || !isFinite(x)) return "–";
  return Number(x).toFixed(digits);
}
function ago(ms, now) {
  if (!ms) return "never";
  const s = Math.max(0, (now - ms) / 1000);
  return s < 120 ? s.toFixed(1) + " s ago" : (s / 60).toFixed(1) + " min ago";
}
function fill(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  for (const cells of rows) {
    const tr = el("tr");
    for (const c of cells) tr.appendChild(c);
    body.appendChild(tr);
  }
}
function chart(points) {
  const svg = document.getElementById("chart");
  const W = 720, H = 200, P = 30;
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  if (!points.length) return;
  const t0 = points[0].t, t1 = Math.max(points[points.length - 1].t, t0 + 1);
  const maxR = Math.max(1, ...points.map(p => p.rps));
  const lags = points.filter(p => p.lag !== null);
  const maxL = Math.max(0.001, ...lags.map(p => p.lag));
  const x = t => P + (W - 2 * P) * (t - t0) / (t1 - t0);
  const line = (pts, y, color, id) => {
    if (!pts.length) return;
    const path = document.createElementNS(ns, "polyline");
    path.setAttribute("points", pts.map(p => x(p.t).toFixed(1) + "," + y(p).toFixed(1)).join(" "));
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", color);
    path.setAttribute("stroke-width", "2");
    path.setAttribute("id", id);
    svg.appendChild(path);
  };
  line(points, p => H - P - (H - 2 * P) * p.rps / maxR, "#2463eb", "rps-line");
  line(lags, p => H - P - (H - 2 * P) * p.lag / maxL, "#d9480f", "lag-line");
  const label = (text, xx, yy, anchor) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", xx); t.setAttribute("y", yy);
    t.setAttribute("font-size", "11"); t.setAttribute("text-anchor", anchor);
    t.textContent = text;
    svg.appendChild(t);
  };
  label(fmt(maxR, 1), 2, P, "start");
  label(fmt(maxL, 3) + " s", W - 2, P, "end");
  label("-" + Math.round((t1 - t0) / 60000) + " min", P, H - 8, "start");
  label("now", W - P, H - 8, "end");
}
function render(s) {
  document.getElementById("hub-name").textContent = s.hub;
  const h = document.getElementById("health");
  h.textContent = s.health + ": " + s.reason;
  h.className = s.health;
  document.getElementById("tp-now").textContent = fmt(s.throughput.now_records_per_second, 1);
  document.getElementById("tp-avg").textContent = fmt(s.throughput.average_records_per_second, 1);
  document.getElementById("tp-peak").textContent = fmt(s.throughput.peak_records_per_second, 1);
  document.getElementById("records-24h").textContent = s.last_24h.records;
  document.getElementById("errors-24h").textContent = s.last_24h.errors;
  document.getElementById("conflicts-24h").textContent = s.last_24h.conflicts;
  document.getElementById("total-ops").textContent = s.total_ops;
  fill("tables", s.tables.map(t => [
    el("td", t.table), el("td", t.state, t.state), el("td", fmt(t.lag_seconds, 3), "num"),
    el("td", String(t.records_total), "num records"), el("td", String(t.errors_total), "num"),
    el("td", String(t.conflicts_total), "num"), el("td", t.detail)
  ]));
  fill("nodes", s.nodes.map(n => [
    el("td", n.node), el("td", n.connected ? "up" : "down", n.connected ? "synced" : "error"),
    el("td", n.engine || "?"), el("td", n.mode), el("td", fmt(n.lag_seconds, 3), "num"),
    el("td", String(n.pending_ops), "num"), el("td", ago(n.last_seen_unix_ms, s.now_unix_ms))
  ]));
  chart(s.chart || []);
  document.getElementById("updated").textContent =
    "updated " + new Date(s.now_unix_ms).toISOString();
}
async function poll() {
  try {
    const r = await fetch("/status.json", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
  } catch (e) {
    const h = document.getElementById("health");
    h.textContent = "down: the hub does not answer (" + e.message + ")";
    h.className = "down";
  }
}
poll();
setInterval(poll, 2000);
</script>
</body>
</html>
"##;
