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

// NEWS2 total over time (API `scores/history`): a step line per run, each
// step in its band's colour; a NULL total (not computable) is a grey mark
// on the axis and breaks the line; a step ends at the next point or
// `holdMs` after its own (no evaluation then: a gap, never bridged).
// points: [{time, total, band, missing}].
export function scoreChart(points, fromMs, toMs, nowMs, holdMs) {
  const svg = el('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img' });
  const totals = points.map((p) => p.total).filter((t) => typeof t === 'number');
  const hi = Math.max(10, ...totals.map((t) => t + 1));
  const { x, y } = frame(svg, fromMs, toMs, 0, hi);
  const cx = (ms) => x(Math.min(Math.max(ms, fromMs), toMs));
  // NEWS2 bands as shaded zones: 0-4 low, 5-6 medium, 7+ high.
  for (const [lo, top, band] of [[0, 4.5, 'low'], [4.5, 6.5, 'medium'], [6.5, hi, 'high']]) {
    el('rect', { class: `zone zone-${band}`, x: L, width: W - L - R, y: y(top), height: Math.max(0, y(lo) - y(top)) }, svg);
  }
  let scored = 0, unscored = 0, prev = null;
  points.forEach((p, i) => {
    const t = Date.parse(p.time);
    const next = points[i + 1] ? Date.parse(points[i + 1].time) : Infinity;
    const end = Math.min(next, t + holdMs, nowMs, toMs);
    if (typeof p.total !== 'number') {
      unscored++;
      const mark = el('rect', { class: 'score-na', x: cx(t), y: y(0) - 5, width: Math.max(1.5, cx(end) - cx(t)), height: 5 }, svg);
      el('title', {}, mark).textContent = `not computable: ${(p.missing || []).join(', ')}`;
      prev = null;
      return;
    }
    scored++;
    const band = p.band || 'none';
    if (prev && prev.end >= t) {
      el('line', { class: 'score-join', x1: cx(t), x2: cx(t), y1: y(prev.total), y2: y(p.total) }, svg);
    }
    el('line', { class: `score band-${band}`, x1: cx(t), x2: cx(Math.max(end, t)), y1: y(p.total), y2: y(p.total) }, svg);
    const dot = el('circle', { class: `score-dot band-${band}`, cx: cx(t), cy: y(p.total), r: 2.2 }, svg);
    el('title', {}, dot).textContent = `NEWS2 ${p.total} (${band})`;
    prev = end < next ? null : { total: p.total, end };
  });
  svg.dataset.points = String(scored);
  svg.dataset.unscored = String(unscored);
  return svg;
}
