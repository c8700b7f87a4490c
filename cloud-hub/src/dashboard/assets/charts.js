// SVG charts drawn with DOM calls (no library, no inline style: CSP).
const NS = 'http://www.w3.org/2000/svg';
const W = 600, H = 150, L = 38, R = 8, T = 8, B = 20;

function el(name, attrs = {}, parent = null) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (parent) parent.appendChild(e);
  return e;
}

function timeLabel(ms, spanMs) {
  const d = new Date(ms);
  const hh = String(d.getHours()).padStart(2, '0');
  const mm = String(d.getMinutes()).padStart(2, '0');
  return spanMs > 2 * 86400e3 ? `${d.getDate()}/${d.getMonth() + 1}` : `${hh}:${mm}`;
}

function niceTicks(lo, hi, n = 4) {
  const span = hi - lo || 1;
  const raw = span / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(+v.toFixed(6));
  return out;
}

function frame(svg, fromMs, toMs, lo, hi) {
  const x = (ms) => L + ((ms - fromMs) / (toMs - fromMs)) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo || 1)) * (H - T - B);
  for (const v of niceTicks(lo, hi)) {
    el('line', { class: 'axis', x1: L, x2: W - R, y1: y(v), y2: y(v) }, svg);
    el('text', { x: L - 4, y: y(v) + 3, 'text-anchor': 'end' }, svg).textContent = String(v);
  }
  const span = toMs - fromMs;
  for (let i = 0; i <= 4; i++) {
    const ms = fromMs + (span * i) / 4;
    const t = el('text', { x: x(ms), y: H - 5, 'text-anchor': i === 0 ? 'start' : i === 4 ? 'end' : 'middle' }, svg);
    t.textContent = timeLabel(ms, span);
  }
  return { x, y };
}

// A vital's chart: min-max band and mean line per bucket; dashed limits.
// points: [{start, min, max, mean, count}] (API `series`); limits: numbers.
export function seriesChart(points, fromMs, toMs, resolutionS, limits = [], normal = null) {
  const svg = el('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img' });
  const vals = points.flatMap((p) => [p.min, p.max]).concat(limits);
  if (normal) vals.push(normal[0], normal[1]);
  let lo = Math.min(...vals), hi = Math.max(...vals);
  if (!isFinite(lo)) { lo = 0; hi = 1; }
  const pad = (hi - lo) * 0.08 || 1;
  lo -= pad; hi += pad;
  const { x, y } = frame(svg, fromMs, toMs, lo, hi);
  if (normal) {
    el('rect', { class: 'band', x: L, width: W - L - R, y: y(normal[1]), height: Math.max(0, y(normal[0]) - y(normal[1])) }, svg);
  }
  for (const lim of limits) el('line', { class: 'limit', x1: L, x2: W - R, y1: y(lim), y2: y(lim) }, svg);
  const bucket = resolutionS * 1000;
  // Split into runs at gaps (no bucket), so a gap is never bridged.
  const runs = [];
  let run = [];
  let prev = null;
  for (const p of points) {
    const t = Date.parse(p.start);
    if (prev !== null && t - prev > bucket * 1.5) { runs.push(run); run = []; }
    run.push({ t: t + bucket / 2, p });
    prev = t;
  }
  if (run.length) runs.push(run);
  for (const r of runs) {
    const up = r.map(({ t, p }) => `${x(t).toFixed(1)},${y(p.max).toFixed(1)}`);
    const down = r.slice().reverse().map(({ t, p }) => `${x(t).toFixed(1)},${y(p.min).toFixed(1)}`);
    el('polygon', { class: 'range', points: up.concat(down).join(' ') }, svg);
    if (r.length === 1) {
      el('circle', { class: 'mean', cx: x(r[0].t), cy: y(r[0].p.mean), r: 2 }, svg);
    } else {
      el('polyline', { class: 'mean', points: r.map(({ t, p }) => `${x(t).toFixed(1)},${y(p.mean).toFixed(1)}`).join(' ') }, svg);
    }
  }
  svg.dataset.points = String(points.length);
  return svg;
}

// NEWS2 band over time from the score alerts (news2-medium, news2-high,
// news2-single-parameter-3): each alert paints its raised..resolved span.
export function bandStrip(alerts, fromMs, toMs, nowMs) {
  const svg = el('svg', { viewBox: `0 0 ${W} 60`, role: 'img' });
  const x = (ms) => L + ((Math.min(Math.max(ms, fromMs), toMs) - fromMs) / (toMs - fromMs)) * (W - L - R);
  el('rect', { x: L, y: 8, width: W - L - R, height: 28, class: 'band' }, svg);
  const colour = { 'news2-high': '#c62828', 'news2-medium': '#ef6c00', 'news2-single-parameter-3': '#f9a825' };
  let n = 0;
  for (const a of alerts) {
    const start = a.raised_us / 1000, end = a.resolved_us ? a.resolved_us / 1000 : nowMs;
    if (end < fromMs || start > toMs || !colour[a.code]) continue;
    el('rect', { x: x(start), y: 8, width: Math.max(1.5, x(end) - x(start)), height: 28, fill: colour[a.code] }, svg);
    n++;
  }
  const span = toMs - fromMs;
  for (let i = 0; i <= 4; i++) {
    const ms = fromMs + (span * i) / 4;
    el('text', { x: x(ms), y: 52, 'text-anchor': i === 0 ? 'start' : i === 4 ? 'end' : 'middle' }, svg).textContent = timeLabel(ms, span);
  }
  svg.dataset.spans = String(n);
  return svg;
}
