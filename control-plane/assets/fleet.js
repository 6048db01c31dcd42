// The fleet page: polls GET /v1/fleet/view every second (the session
// cookie authenticates it) and redraws what changed. Everything from the
// agents is put in the page as text, never as HTML.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function span(s) {
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  return `${(s / 3600).toFixed(1)} h`;
}

function pct(x) {
  if (x === null || x === undefined) return "–";
  return x >= 0.1 ? `${Math.round(x * 100)}%` : `${(x * 100).toFixed(1)}%`;
}

function ms(x) {
  return x === null || x === undefined ? "–" : `${x.toFixed(1)} ms`;
}

function condition(p) {
  if (p.stale) return "stale";
  if (!p.active) return "no-path";
  if (p.active.startsWith("via:")) return "detoured";
  if (p.config_error || p.paths.some((x) => x.state !== "up")) return "degraded";
  return "direct";
}

// A 15-minute sparkline: RTT as a line, loss as red bars from the bottom,
// and a strip of each bucket's worst state underneath.
function sparkline(h) {
  const n = h.state.length, w = 120, top = 20, strip = 5, step = w / n;
  const s = svg("svg", { class: "spark", width: w, height: top + strip + 1, viewBox: `0 0 ${w} ${top + strip + 1}`, role: "img" });
  const rtts = h.rtt_ms.filter((v) => v !== null);
  const max = rtts.length ? Math.max(...rtts, 1) : 1;
  const maxLoss = Math.max(0, ...h.loss.filter((v) => v !== null));
  s.append(svg("title", {}, `last 15 min: RTT up to ${rtts.length ? max.toFixed(1) + " ms" : "–"}, loss up to ${pct(maxLoss)}`));
  h.loss.forEach((v, i) => {
    if (v) s.append(svg("rect", { class: "loss", x: i * step, y: top - v * top, width: Math.max(step - 1, 1), height: v * top }));
  });
  let points = [];
  const lines = [];
  h.rtt_ms.forEach((v, i) => {
    if (v === null) { if (points.length) lines.push(points); points = []; return; }
    points.push(`${(i * step + step / 2).toFixed(1)},${(top - 1 - (v / max) * (top - 2)).toFixed(1)}`);
  });
  if (points.length) lines.push(points);
  for (const l of lines) {
    if (l.length === 1) l.push(l[0]);
    s.append(svg("polyline", { class: "rtt", points: l.join(" ") }));
  }
  [...h.state].forEach((c, i) => {
    s.append(svg("rect", { class: c === "-" ? "s-none" : `s-${c}`, x: i * step, y: top + 1, width: Math.max(step - 0.5, 0.5), height: strip }));
  });
  return s;
}

function tile(p) {
  const cond = condition(p);
  const badge = p.stale
    ? el("span", { class: "badge stale" }, "stale")
    : el("span", { class: `badge ${!p.active ? "none" : p.active.startsWith("via:") ? "via" : "direct"}`, "data-role": "active" }, p.active || "no path");
  const head = el("h3", {}, p.pop, badge, p.stale && p.active ? el("span", { class: "muted" }, `last on ${p.active}`) : null);
  const meta = el("p", { class: "meta muted", "data-role": "age" });
  const table = el("table", { class: "paths" },
    el("tr", {}, el("th", {}, "path"), el("th", {}, "state"), el("th", { class: "num" }, "RTT"), el("th", { class: "num" }, "loss"), el("th", {}, "15 min")));
  for (const x of p.paths) {
    table.append(el("tr", { class: x.active ? "active" : null, "data-path": x.path },
      el("td", {}, x.active ? "▶ " : "", x.path),
      el("td", { class: `state-${x.state}` }, x.state),
      el("td", { class: "num" }, ms(x.rtt_ms)),
      el("td", { class: "num" }, pct(x.loss)),
      el("td", {}, sparkline(x.history))));
    if (x.reason && x.state !== "up") {
      table.append(el("tr", {}, el("td", { class: "reason", colspan: 5 }, x.reason)));
    }
  }
  const sw = p.last_switch
    ? el("p", { class: "switch", "data-role": "last-switch" }, el("time", {}, clock(p.last_switch.at_ms)), " ",
        `${p.last_switch.from} → ${p.last_switch.to}: ${p.last_switch.reason}`)
    : null;
  const cfg = p.config_error ? el("p", { class: "switch state-down" }, "config reload failed: ", p.config_error) : null;
  return el("article", { class: "pop", "data-pop": p.pop, "data-active": p.active || "", "data-stale": String(p.stale), "data-condition": cond },
    head, meta, sw, cfg, table);
}

function setAge(t, p) {
  const meta = t.querySelector('[data-role="age"]');
  const age = p.stale ? `no report for ${span(p.age_s)}` : `reported ${span(p.age_s)} ago`;
  meta.textContent = `${age}${p.version ? " · " + p.version : ""}`;
}

const tiles = new Map(); // pop -> {sig, el}

function drawPops(view) {
  const box = document.getElementById("pops");
  const seen = new Set();
  const order = [];
  for (const p of view.pops) {
    seen.add(p.pop);
    const { age_s, received_at_ms, ...rest } = p;
    const sig = JSON.stringify(rest);
    let t = tiles.get(p.pop);
    if (!t || t.sig !== sig) {
      const fresh = tile(p);
      if (t) t.el.replaceWith(fresh);
      t = { sig, el: fresh };
      tiles.set(p.pop, t);
    }
    setAge(t.el, p);
    order.push(t.el);
  }
  for (const [pop, t] of tiles) if (!seen.has(pop)) { t.el.remove(); tiles.delete(pop); }
  // Move only what is out of place, so nothing flickers.
  order.forEach((e, i) => { if (box.children[i] !== e) box.insertBefore(e, box.children[i] || null); });
  applyFilter();
}

function applyFilter() {
  const q = document.getElementById("filter").value.trim().toLowerCase();
  for (const [pop, t] of tiles) t.el.hidden = q !== "" && !pop.includes(q);
}

// Who goes through whom: the PoPs in a detour on a circle, an arrow from
// each to the peer carrying it.
function drawDetours(view) {
  const box = document.getElementById("detours");
  const sig = JSON.stringify(view.detours);
  if (box.dataset.sig === sig) return;
  box.dataset.sig = sig;
  box.replaceChildren();
  if (!view.detours.length) {
    box.append(el("p", { class: "muted", "data-role": "no-detours" }, "Every reporting PoP is on its own uplink."));
    return;
  }
  const names = [...new Set(view.detours.flatMap((d) => [d.from, d.via]))].sort();
  const W = 320, H = names.length > 2 ? 220 : 120, R = names.length > 2 ? 80 : 0, r = 20;
  const pos = new Map(names.map((n, i) => {
    if (names.length <= 2) return [n, [W / 2 + (i ? 90 : -90), H / 2]];
    const a = (2 * Math.PI * i) / names.length - Math.PI / 2;
    return [n, [W / 2 + R * Math.cos(a), H / 2 + R * Math.sin(a)]];
  }));
  const s = svg("svg", { class: "detour-map", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "detours" });
  s.append(svg("defs", {}, svg("marker", { id: "head", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
    svg("path", { d: "M0,0 L10,5 L0,10 z" }))));
  const staleFrom = new Set(view.detours.filter((d) => d.stale).map((d) => d.from));
  for (const d of view.detours) {
    const [x1, y1] = pos.get(d.from), [x2, y2] = pos.get(d.via);
    const len = Math.hypot(x2 - x1, y2 - y1) || 1, ux = (x2 - x1) / len, uy = (y2 - y1) / len;
    const a = svg("line", { class: `arrow${d.stale ? " stale" : ""}`, x1: x1 + ux * r, y1: y1 + uy * r, x2: x2 - ux * (r + 2), y2: y2 - uy * (r + 2), "marker-end": "url(#head)", "data-from": d.from, "data-via": d.via });
    a.append(svg("title", {}, `${d.from} goes through ${d.via}${d.stale ? " (last known)" : ""}`));
    s.append(a);
  }
  for (const n of names) {
    const [x, y] = pos.get(n);
    s.append(svg("g", { class: `node${staleFrom.has(n) ? " stale" : ""}` }, svg("circle", { cx: x, cy: y, r }), svg("text", { x, y }, n)));
  }
  box.append(s);
  box.append(el("ul", { class: "events" }, ...view.detours.map((d) =>
    el("li", { "data-from": d.from }, `${d.from} → ${d.via}`, d.stale ? " (stale)" : ""))));
}

function drawEvents(id, list, line) {
  const box = document.getElementById(id);
  const sig = JSON.stringify(list);
  if (box.dataset.sig === sig) return;
  box.dataset.sig = sig;
  box.replaceChildren(...(list.length ? list.map((e) => el("li", { "data-pop": e.pop }, el("time", {}, clock(e.at_ms)), line(e)))
    : [el("li", { class: "muted" }, "none recorded")]));
}

function draw(view) {
  const s = view.summary;
  document.getElementById("summary").textContent =
    `${s.pops} PoPs: ${s.direct} direct, ${s.detoured} via a peer, ${s.no_path} without a path, ${s.stale} stale`;
  drawPops(view);
  drawDetours(view);
  drawEvents("switches", view.switches, (e) => `${e.pop}: ${e.from} → ${e.to}: ${e.reason}`);
  drawEvents("refusals", view.refusals, (e) => `${e.pop} refused ${e.n} × ${e.reason}`);
}

let lastOk = null;

async function poll() {
  const banner = document.getElementById("banner");
  try {
    const r = await fetch("/v1/fleet/view", { credentials: "same-origin", cache: "no-store" });
    if (r.status === 401) { location.assign("/fleet/login"); return; }
    if (!r.ok) throw new Error(`the control plane answered ${r.status}`);
    const view = await r.json();
    draw(view);
    lastOk = Date.now();
    banner.hidden = true;
    document.getElementById("freshness").textContent = `updated ${clock(lastOk)}`;
  } catch (e) {
    banner.hidden = false;
    banner.textContent = `No fresh data${lastOk ? " since " + clock(lastOk) : ""}: ${e.message}. Retrying every second.`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.getElementById("filter").addEventListener("input", applyFilter);
poll();
