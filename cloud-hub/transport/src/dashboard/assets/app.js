// Vigil clinician dashboard: a single-page app on the hub's JSON APIs.
// Views by hash: #/login, #/ward[/WARD], #/patient/ID[/1h|8h|24h],
// #/alerts, #/gateways. No framework; all text goes in through
// textContent (never innerHTML), so API data cannot inject markup.
import { seriesChart, scoreChart } from './charts.js';

const $ = (sel, root = document) => root.querySelector(sel);
const view = () => $('#view');

// ---- tiny DOM helper ------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

// ---- session and API --------------------------------------------------------
const session = { user: null, role: null, csrf: null };

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (method !== 'GET' && session.csrf) headers['X-CSRF-Token'] = session.csrf;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await fetch(path, {
    method, headers, credentials: 'same-origin', cache: 'no-store',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 204) return null;
  let data = null;
  try { data = await resp.json(); } catch { data = null; }
  if (!resp.ok) {
    const msg = (data && data.error) || `${resp.status} ${resp.statusText}`;
    if (resp.status === 401 && !path.startsWith('/api/v1/session')) {
      session.user = null;
      stopStream();
      go('#/login');
    }
    throw new ApiError(resp.status, msg);
  }
  return data;
}

function problem(e) {
  if (e.status === 403) {
    return h('p', { class: 'notice', dataset: { error: '403' } },
      `Your role (${session.role || 'none'}) may not see or change this: ${e.message}`);
  }
  return h('p', { class: 'notice', dataset: { error: String(e.status || 'network') } }, `Could not load: ${e.message}`);
}

// ---- formatting ------------------------------------------------------------
const VITALS = [
  { p: 'respiration_rate', label: 'RR', name: 'Respiration rate', unit: '/min', codes: [151562], normal: [12, 20] },
  { p: 'spo2', label: 'SpO₂', name: 'SpO₂', unit: '%', codes: [150456], normal: [96, 100] },
  { p: 'systolic_bp', label: 'SBP', name: 'Systolic BP', unit: 'mmHg', codes: [150021], normal: [111, 219] },
  { p: 'pulse', label: 'Pulse', name: 'Pulse', unit: '/min', codes: [147842, 149530, 149546], normal: [51, 90] },
  { p: 'temperature', label: 'Temp', name: 'Temperature', unit: '°C', codes: [150364], normal: [36.1, 38.0] },
];

function fmtValue(v) {
  if (typeof v !== 'number') return '–';
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}

function fmtAge(s) {
  if (typeof s !== 'number') return '';
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

function fmtTime(us) {
  if (!us) return '';
  const d = new Date(us / 1000);
  return d.toLocaleString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', day: '2-digit', month: 'short' });
}

function fmtIso(iso) {
  return iso ? fmtTime(Date.parse(iso) * 1000) : '–';
}

function bandLabel(b) {
  return { low: 'low', 'low-medium': 'low-med (3)', medium: 'medium', high: 'high' }[b] || 'no score';
}

function toast(text) {
  const t = $('#toast');
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
}

// ---- live alert stream -----------------------------------------------------
let stream = null;
const listeners = new Set();

let alertsAllowed = true;

function startStream() {
  if (stream || !alertsAllowed) return;
  let opened = false;
  stream = new EventSource('/api/v1/alerts/stream');
  stream.addEventListener('open', () => { opened = true; setLive(true); });
  stream.addEventListener('error', async () => {
    setLive(false);
    if (opened) return; // a dropped stream: EventSource reconnects by itself
    // Never opened: a role without alert access stops here instead of
    // retrying (and being refused) every few seconds.
    try { await api('GET', '/api/v1/alerts?_count=1'); } catch (e) {
      if (e.status === 403) {
        alertsAllowed = false;
        stopStream();
        $('#live').textContent = 'no alert access';
      }
    }
  });
  stream.addEventListener('alert', (ev) => {
    let msg = null;
    try { msg = JSON.parse(ev.data); } catch { return; }
    if (msg.transition === 'raised' && msg.alert) {
      toast(`${msg.alert.priority} alert: ${msg.alert.message}`);
    }
    for (const f of listeners) f(msg);
    refreshAlertCount();
  });
  stream.addEventListener('lagged', () => { for (const f of listeners) f(null); });
}

function stopStream() {
  if (stream) { stream.close(); stream = null; }
  setLive(false);
}

function setLive(on) {
  const l = $('#live');
  l.textContent = on ? 'live' : 'offline';
  l.classList.toggle('on', on);
}

async function refreshAlertCount() {
  if (!alertsAllowed) return;
  try {
    const d = await api('GET', '/api/v1/alerts?open=true&_count=1000');
    const n = d.alerts.filter((a) => a.state === 'active').length;
    const c = $('#alert-count');
    c.textContent = String(n);
    c.hidden = n === 0;
  } catch { /* shown by the views */ }
}

// ---- router ----------------------------------------------------------------
let cleanup = [];
let current = {}; // a new token per route: views check it after an await
function onLeave(f) { cleanup.push(f); }

function go(hash) {
  if (location.hash === hash) route(); else location.hash = hash;
}

async function route() {
  for (const f of cleanup) f();
  cleanup = [];
  current = {};
  listeners.clear();
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  if (parts[0] !== 'login' && !session.user) {
    try {
      const s = await api('GET', '/api/v1/session');
      setSession(s);
    } catch {
      sessionStorage.setItem('vigil.after-login', location.hash || '#/');
      return renderLogin();
    }
  }
  // Operators see no patient data: their start page is the fleet.
  const name = parts[0] || (session.role === 'operator' ? 'gateways' : 'ward');
  for (const a of document.querySelectorAll('[data-nav]')) a.classList.toggle('active', a.dataset.nav === name);
  switch (name) {
    case 'login': return renderLogin();
    case 'patient': return renderPatient(parts[1], parts[2] || '1h');
    case 'alerts': return renderAlerts();
    case 'gateways': return renderGateways();
    default: return renderWard(parts[1]);
  }
}

function setSession(s) {
  alertsAllowed = true;
  session.user = s.user;
  session.role = s.role;
  session.csrf = s.csrf_token;
  $('#bar').hidden = false;
  $('#who').textContent = `${s.user} (${s.role})`;
  startStream();
  refreshAlertCount();
}

// ---- login -----------------------------------------------------------------
function renderLogin() {
  $('#bar').hidden = true;
  const v = view();
  v.replaceChildren($('#login-template').content.cloneNode(true));
  const form = $('#login', v);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const fd = new FormData(form);
    $('#login-error').textContent = '';
    try {
      const s = await api('POST', '/api/v1/session', { username: fd.get('username'), password: fd.get('password') });
      setSession(s);
      const next = sessionStorage.getItem('vigil.after-login') || '#/';
      sessionStorage.removeItem('vigil.after-login');
      go(next === '#/login' ? '#/' : next);
    } catch (e) {
      $('#login-error').textContent = e.status === 401 ? 'Wrong user name or password.' : `Sign-in failed: ${e.message}`;
    }
  });
  $('input[name=username]', form).focus();
}

async function logout() {
  try { await api('DELETE', '/api/v1/session'); } catch { /* gone anyway */ }
  session.user = session.role = session.csrf = null;
  stopStream();
  go('#/login');
}

// ---- polling helper: every `ms` while the page is visible, plus on alert
// events; never two loads at once.
function live(load, ms) {
  let busy = false, again = false, timer = null, stopped = false;
  const run = async () => {
    if (stopped) return;
    if (busy) { again = true; return; }
    busy = true;
    try { await load(); } finally {
      busy = false;
      if (again) { again = false; run(); }
    }
  };
  const tick = () => {
    if (!document.hidden) run();
    timer = setTimeout(tick, ms);
  };
  listeners.add(() => run());
  onLeave(() => { stopped = true; clearTimeout(timer); });
  tick();
  return run;
}

// ---- ward view -------------------------------------------------------------
async function wards() {
  // Occupancy is clinical data, the bed list equipment data: either names
  // the wards, depending on the role.
  for (const path of ['/api/v1/occupancy', '/api/v1/beds']) {
    try {
      const d = await api('GET', path);
      return [...new Set(d.beds.map((b) => b.ward))].sort();
    } catch (e) {
      if (e.status === 401) throw e;
    }
  }
  return null; // neither allowed: the ward is typed in
}

async function renderWard(ward) {
  const v = view();
  const tok = current;
  const list = await wards().catch(() => null);
  if (tok !== current) return;
  ward = ward || localStorage.getItem('vigil.ward') || (list && list[0]);
  const picker = list && list.length
    ? h('select', { id: 'ward-picker', onchange: (e) => go(`#/ward/${encodeURIComponent(e.target.value)}`) },
      list.map((w) => h('option', { value: w, selected: w === ward }, w)))
    : h('input', { id: 'ward-picker', placeholder: 'ward', value: ward || '', onchange: (e) => go(`#/ward/${encodeURIComponent(e.target.value)}`) });
  const tiles = h('section', { class: 'tiles', id: 'tiles' });
  const status = h('span', { class: 'muted', id: 'ward-status' });
  v.replaceChildren(h('div', { class: 'toolbar' }, h('h1', {}, 'Ward'), picker, h('span', { class: 'spacer' }), status), tiles);
  if (!ward) { tiles.replaceChildren(h('p', { class: 'notice' }, 'No beds yet: create beds and admit patients (docs/association.md).')); return; }
  localStorage.setItem('vigil.ward', ward);
  live(async () => {
    try {
      const [d, open] = await Promise.all([
        api('GET', `/api/v1/wards/${encodeURIComponent(ward)}/overview`),
        api('GET', '/api/v1/alerts?open=true&_count=1000').catch(() => ({ alerts: [] })),
      ]);
      const byPatient = new Map();
      for (const a of open.alerts) {
        if (!a.patient) continue;
        if (!byPatient.has(a.patient)) byPatient.set(a.patient, []);
        byPatient.get(a.patient).push(a);
      }
      tiles.replaceChildren(...(d.beds.length ? d.beds.map((b) => tile(b, byPatient)) : [h('p', { class: 'notice' }, `No beds in ward ${ward}.`)]));
      status.textContent = `updated ${new Date(Date.parse(d.at)).toLocaleTimeString()}`;
    } catch (e) {
      if (e.status !== 401) tiles.replaceChildren(problem(e));
    }
  }, 1000);
}

function tile(b, byPatient) {
  const p = b.patient && b.patient.value;
  const band = b.news2 ? b.news2.band : 'none';
  const vitals = new Map((b.vitals || []).map((x) => [x.parameter, x]));
  const alerts = (p && byPatient.get(p)) || [];
  const head = h('div', { class: 'tile-head' },
    h('span', { class: 'bed' }, b.bed.label || b.bed.id),
    h('span', { class: 'patient', title: p || '' }, p || 'empty bed'),
    h('span', { class: `news2 band-${band}`, title: 'NEWS2', dataset: { news2: b.news2 ? String(b.news2.total) : '' } },
      b.news2 ? String(b.news2.total) : '–', h('small', {}, b.news2 ? bandLabel(band) : 'NEWS2 n/a')));
  const body = p
    ? h('div', { class: 'vitals' }, VITALS.map((vt) => {
      const x = vitals.get(vt.p);
      return h('div', {
        class: `vital${x ? (x.stale ? ' stale' : '') : ' missing'}`,
        dataset: { parameter: vt.p, value: x ? String(x.value) : '', stale: x ? String(x.stale) : '' },
        title: x ? `${vt.name} at ${fmtIso(x.time)}${x.stale ? ' (stale: older than the freshness window)' : ''}` : `${vt.name}: no value`,
      },
      h('span', { class: 'label' }, vt.label),
      h('span', { class: 'value' }, x ? fmtValue(x.value) : '–'),
      h('span', { class: 'age' }, x ? (x.stale ? `stale ${fmtAge(x.age_s)}` : fmtAge(x.age_s)) : 'no value'));
    }))
    : h('p', { class: 'muted' }, 'No patient');
  const alertLine = h('div', { class: 'tile-alerts', dataset: { open: String(alerts.length) } },
    alerts.length
      ? [h('span', { class: `pill ${alerts.some((a) => a.state === 'active') ? (b.alerts && b.alerts.highest) || 'low' : 'acknowledged'}` },
        `${alerts.length} alert${alerts.length > 1 ? 's' : ''}`),
      h('span', { class: 'muted' }, alerts.slice(0, 2).map((a) => a.message).join('; '))]
      : h('span', { class: 'muted' }, p ? 'no open alerts' : ''));
  return h('article', {
    class: `tile band-${band}${p ? '' : ' empty'}`,
    dataset: { bed: b.bed.id, patient: p || '', band },
    onclick: p ? () => go(`#/patient/${encodeURIComponent(p)}`) : undefined,
  }, head, body, alertLine);
}

// ---- patient view ----------------------------------------------------------
const RANGES = { '1h': [3600, 60], '8h': [8 * 3600, 300], '24h': [24 * 3600, 300] };

async function renderPatient(id, range) {
  if (!id) return go('#/ward');
  if (!RANGES[range]) range = '1h';
  const v = view();
  const enc = encodeURIComponent(id);
  const seg = h('span', { class: 'segmented' }, Object.keys(RANGES).map((r) =>
    h('button', { type: 'button', class: r === range ? 'on' : '', onclick: () => go(`#/patient/${enc}/${r}`) }, r)));
  const scoreCard = h('div', { class: 'card', id: 'score' }, 'Loading…');
  const manualCard = h('div', { class: 'card', id: 'manual' });
  const charts = h('section', { class: 'charts', id: 'charts' });
  const history = h('section', { id: 'history' });
  const limits = h('section', { id: 'limits' });
  v.replaceChildren(
    h('div', { class: 'toolbar' }, h('a', { href: '#/ward' }, '← Ward'), h('h1', {}, `Patient ${id}`), h('span', { class: 'spacer' }), seg),
    h('section', { class: 'cards' }, scoreCard, manualCard),
    h('h2', {}, `Trends, last ${range}`), charts,
    h('h2', {}, 'Alert history'), history,
    h('h2', {}, 'Alert limits in force'), limits);
  renderManualForm(manualCard, id);
  const tok = current;
  let rules = [];
  try {
    const r = await api('GET', `/api/v1/patients/${enc}/alert-rules`);
    rules = r.rules.filter((x) => x.enabled);
    limits.replaceChildren(h('table', {}, h('tr', {}, ['Rule', 'Parameter', 'Condition', 'Priority', 'Delay', 'Hysteresis'].map((c) => h('th', {}, c))),
      rules.map((x) => h('tr', {}, h('td', {}, x.id), h('td', {}, x.parameter), h('td', {}, `${x.direction} ${x.limit}`),
        h('td', {}, x.priority), h('td', { class: 'num' }, `${x.delay_s} s`), h('td', { class: 'num' }, String(x.hysteresis))))));
  } catch (e) { limits.replaceChildren(problem(e)); }
  if (tok !== current) return;
  const [spanS, res] = RANGES[range];
  live(async () => {
    const to = Date.now(), from = to - spanS * 1000;
    const iso = (ms) => new Date(ms).toISOString().replace(/\.\d+Z$/, 'Z');
    try {
      const scores = await api('GET', `/api/v1/patients/${enc}/scores`);
      renderScore(scoreCard, scores);
    } catch (e) { scoreCard.replaceChildren(problem(e)); }
    let alerts = [];
    try {
      alerts = (await api('GET', `/api/v1/alerts?patient=${enc}&_count=200`)).alerts;
      history.replaceChildren(alertTable(alerts, false));
    } catch (e) { history.replaceChildren(problem(e)); }
    const cards = [];
    try {
      const hist = await api('GET', `/api/v1/patients/${enc}/scores/history?kind=news2&from=${iso(from)}&to=${iso(to)}`);
      const last = hist.points[hist.points.length - 1];
      cards.push(h('div', { class: 'chart', dataset: { chart: 'news2' } },
        h('h3', {}, 'NEWS2', h('span', { class: 'muted' }, 'total over time · grey: not computable'),
          h('span', { class: 'now' }, last ? (typeof last.total === 'number' ? String(last.total) : 'n/a') : 'no data')),
        scoreChart(hist.points, from, to, Date.now(), 2 * hist.heartbeat_s * 1000)));
    } catch (e) {
      if (e.status === 401) return;
      cards.push(h('div', { class: 'chart', dataset: { chart: 'news2' } }, h('h3', {}, 'NEWS2'), problem(e)));
    }
    for (const vt of VITALS) {
      let best = null;
      for (const code of vt.codes) {
        try {
          const s = await api('GET', `/api/v1/patients/${enc}/series?code=${code}&from=${iso(from)}&to=${iso(to)}&resolution=${res}`);
          if (!best || s.points.length > best.points.length) best = s;
        } catch (e) {
          if (e.status === 401) return;
          cards.push(h('div', { class: 'chart' }, h('h3', {}, vt.name), problem(e)));
          break;
        }
      }
      if (!best) continue;
      const last = best.points[best.points.length - 1];
      const lims = rules.filter((r) => r.parameter === vt.p).map((r) => r.limit);
      const trend = best.trend && typeof best.trend.per_hour === 'number' ? `${best.trend.per_hour >= 0 ? '+' : ''}${best.trend.per_hour.toFixed(1)}/h` : '';
      cards.push(h('div', { class: 'chart', dataset: { chart: vt.p, points: String(best.points.length) } },
        h('h3', {}, vt.name, h('span', { class: 'muted' }, `${best.code.display} · ${vt.unit} · trend ${trend || 'n/a'}`),
          h('span', { class: 'now' }, last ? fmtValue(+last.mean.toFixed(1)) : 'no data')),
        seriesChart(best.points, from, to, best.resolution_s, lims, vt.normal)));
    }
    charts.replaceChildren(...cards);
  }, 5000);
}

const PARAM_NAMES = {
  respiration_rate: 'Respiration rate', spo2: 'SpO₂', supplemental_oxygen: 'Air or oxygen',
  systolic_bp: 'Systolic BP', pulse: 'Pulse', consciousness: 'Consciousness', temperature: 'Temperature',
};
const UNITS = { 'mm[Hg]': 'mmHg', Cel: '°C', '{score}': '' };

function inputText(i) {
  if (!i) return '–';
  if (i.parameter === 'supplemental_oxygen') return i.value ? 'oxygen' : 'air';
  const v = typeof i.value === 'number' ? fmtValue(i.value) : String(i.value).replace('_', ' ');
  return i.unit ? `${v} ${UNITS[i.unit] || i.unit}` : v;
}

function renderScore(card, s) {
  const n = s.news2;
  const inputs = s.inputs || { missing: [], stale: [] };
  card.replaceChildren(
    h('h2', {}, 'NEWS2 ',
      h('span', { class: `news2 band-${n ? n.band : 'none'}`, id: 'news2-total' }, n ? String(n.total) : '–', h('small', {}, n ? bandLabel(n.band) : 'not computable'))),
    n
      ? h('table', { class: 'components' }, h('tr', {}, h('th', {}, 'Parameter'), h('th', {}, 'Value'), h('th', {}, 'Score')),
        n.components.map((c) => h('tr', {}, h('td', {}, (PARAM_NAMES[c.parameter] || c.parameter) + (c.scale ? ` (scale ${c.scale})` : '')),
          h('td', {}, inputText(c.input)),
          h('td', { class: 'num' }, String(c.score)))))
      : h('p', { class: 'notice' }, `Not computed: missing ${inputs.missing.join(', ') || 'none'}; stale ${inputs.stale.map((i) => i.parameter).join(', ') || 'none'}. A score is never computed from missing or stale inputs.`),
    h('p', { class: 'muted' }, `qSOFA ${s.qsofa ? s.qsofa.score : '–'} · MEWS ${s.mews ? s.mews.total : '–'} · freshness window ${Math.round(s.freshness_s / 60)} min`));
}

function renderManualForm(card, id) {
  const sel = (name, opts) => h('select', { name }, opts.map(([v, l]) => h('option', { value: v }, l)));
  const msg = h('p', { class: 'muted', id: 'manual-status' });
  const form = h('form', { id: 'manual-form' },
    h('label', {}, 'Consciousness (ACVPU)'),
    sel('consciousness', [['', '— unchanged —'], ['alert', 'Alert'], ['new_confusion', 'New confusion'], ['voice', 'Voice'], ['pain', 'Pain'], ['unresponsive', 'Unresponsive']]),
    h('label', {}, 'Air or oxygen'),
    sel('supplemental_oxygen', [['', '— unchanged —'], ['false', 'Air'], ['true', 'Supplemental oxygen']]),
    h('label', {}, 'SpO₂ scale'),
    sel('spo2_scale', [['', '— unchanged —'], ['1', 'Scale 1'], ['2', 'Scale 2 (hypercapnic respiratory failure)']]),
    h('button', { type: 'submit' }, 'Record'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const fd = new FormData(form);
    const body = {};
    if (fd.get('consciousness')) body.consciousness = fd.get('consciousness');
    if (fd.get('supplemental_oxygen')) body.supplemental_oxygen = fd.get('supplemental_oxygen') === 'true';
    if (fd.get('spo2_scale')) body.spo2_scale = Number(fd.get('spo2_scale'));
    if (!Object.keys(body).length) { msg.textContent = 'Choose at least one value.'; return; }
    try {
      const s = await api('PUT', `/api/v1/patients/${encodeURIComponent(id)}/manual-inputs`, body);
      renderScore($('#score'), s);
      msg.textContent = `Recorded at ${new Date().toLocaleTimeString()}.`;
      form.reset();
    } catch (e) {
      msg.textContent = e.status === 403 ? `Your role (${session.role}) may not record observations.` : `Not recorded: ${e.message}`;
    }
  });
  card.replaceChildren(h('h2', {}, 'Observations at the bedside'), form, msg);
}

// ---- alert list ------------------------------------------------------------
function alertTable(alerts, withAck) {
  if (!alerts.length) return h('p', { class: 'muted', id: 'no-alerts' }, 'No alerts.');
  return h('table', { id: withAck ? 'alert-table' : 'history-table' },
    h('tr', {}, ['Priority', 'State', 'Raised', 'Patient', 'Alert', 'Value', 'Source', ''].map((c) => h('th', {}, c))),
    alerts.map((a) => h('tr', { class: `alert-row state-${a.state}`, dataset: { alertId: String(a.id), state: a.state, code: a.code } },
      h('td', {}, h('span', { class: `pill ${a.priority}` }, a.priority)),
      h('td', { class: 'state' }, a.state + (a.escalated_us && a.state === 'active' ? ' (escalated)' : ''),
        a.acknowledged_by ? h('div', { class: 'muted' }, `by ${a.acknowledged_by}`) : null),
      h('td', {}, fmtTime(a.raised_us)),
      h('td', {}, a.patient ? h('a', { href: `#/patient/${encodeURIComponent(a.patient)}` }, a.patient) : '–'),
      h('td', {}, a.message),
      h('td', { class: 'num' }, typeof a.value === 'number' ? `${fmtValue(a.value)} ${UNITS[a.unit] ?? a.unit ?? ''}` : ''),
      h('td', { class: 'muted' }, [a.gateway_id, a.device_id].filter(Boolean).join(' / ')),
      h('td', {}, withAck && a.state === 'active'
        ? h('button', { type: 'button', class: 'ack', onclick: (ev) => acknowledge(a.id, ev.target) }, 'Acknowledge')
        : null))));
}

async function acknowledge(id, button) {
  button.disabled = true;
  try {
    await api('POST', `/api/v1/alerts/${id}/acknowledge`);
    toast(`Alert ${id} acknowledged.`);
  } catch (e) {
    toast(e.status === 403 ? `Your role (${session.role}) may not acknowledge alerts.` : `Not acknowledged: ${e.message}`);
    button.disabled = false;
  }
  for (const f of listeners) f(null);
  refreshAlertCount();
}

function renderAlerts() {
  const v = view();
  const all = h('input', { type: 'checkbox', id: 'show-resolved' });
  const body = h('section', { id: 'alerts' });
  v.replaceChildren(h('div', { class: 'toolbar' }, h('h1', {}, 'Alerts'), h('label', {}, all, ' include resolved')), body);
  const load = live(async () => {
    try {
      const d = await api('GET', `/api/v1/alerts?${all.checked ? '' : 'open=true&'}_count=500`);
      body.replaceChildren(alertTable(d.alerts, true));
    } catch (e) { if (e.status !== 401) body.replaceChildren(problem(e)); }
  }, 2000);
  all.addEventListener('change', load);
}

// ---- gateways and devices ---------------------------------------------------
function renderGateways() {
  const v = view();
  const body = h('section', { id: 'gateways' });
  v.replaceChildren(h('div', { class: 'toolbar' }, h('h1', {}, 'Gateways & devices')),
    h('p', { class: 'muted' }, 'Backlog is not reported to the hub over HTTPS: see the agent\'s own /metrics (or the IoT Hub device twin). Counts cover the last 24 h unless marked total.'),
    body);
  live(async () => {
    try {
      const [d, open] = await Promise.all([
        api('GET', '/api/v1/gateways'),
        api('GET', '/api/v1/alerts?open=true&_count=1000').catch(() => null),
      ]);
      // null: this role may not read alerts (they carry patient identifiers).
      const tech = open && open.alerts.filter((a) => a.kind === 'technical');
      body.replaceChildren(...d.gateways.map((g) => gatewayCard(g, tech)));
      if (!d.gateways.length) body.replaceChildren(h('p', { class: 'notice' }, 'No gateways registered (cloud-hub gateway add).'));
    } catch (e) { if (e.status !== 401) body.replaceChildren(problem(e)); }
  }, 2000);
}

function gatewayCard(g, tech) {
  const age = g.last_seen_age_s;
  const ageClass = age === null ? 'warn' : age > 120 ? 'bad' : age > 30 ? 'warn' : '';
  const c = g.last_24h;
  const gwAlerts = tech ? tech.filter((a) => a.gateway_id === g.id && !a.device_id) : [];
  return h('div', { class: 'card', dataset: { gateway: g.id } },
    h('h2', {}, g.id, g.revoked ? h('span', { class: 'bad' }, ' (revoked)') : null),
    h('p', {},
      'Last batch: ', h('span', { class: ageClass }, g.last_seen ? `${fmtIso(g.last_seen)} (${fmtAge(age)} ago)` : 'never'),
      g.last_batch ? ` · seq ${g.last_batch.sequence} · agent ${g.last_batch.agent_version || '?'}` : '',
      h('br'),
      `Batches ${c.batches} · readings accepted ${c.accepted} · duplicates ${c.duplicates} · rejected ${c.rejected} (total ${g.rejected_total})`,
      h('br'),
      'Buffer overflows (total): ', h('span', { class: g.buffer_overflows.count ? 'bad' : '' }, String(g.buffer_overflows.count)),
      g.buffer_overflows.last ? ` · last ${fmtIso(g.buffer_overflows.last.time)}: ${g.buffer_overflows.last.detail}` : '',
      g.buffer_incarnation ? h('span', {}, h('br'), `Buffer since ${fmtIso(g.buffer_incarnation.time)}: ${g.buffer_incarnation.detail}`) : null,
      gwAlerts.length ? h('span', { class: 'bad' }, ` · ${gwAlerts.map((a) => a.message).join('; ')}`) : null),
    g.devices.length
      ? h('table', {}, h('tr', {}, ['Device', 'Kind', 'Model', 'Location', 'Last reading', 'Last link event', 'Rejected (total)', 'Open technical alerts'].map((x) => h('th', {}, x))),
        g.devices.map((d) => {
          const da = tech ? tech.filter((a) => a.gateway_id === g.id && a.device_id === d.id) : [];
          const ev = d.last_link_event;
          return h('tr', { dataset: { device: d.id } },
            h('td', {}, d.id), h('td', {}, d.protocol), h('td', {}, [d.manufacturer, d.model].filter(Boolean).join(' ')),
            h('td', {}, d.location),
            h('td', {}, d.last_reading ? `${fmtAge(d.last_reading.age_s)} ago` : 'none'),
            h('td', { class: ev && ev.kind !== 'connected' ? 'bad' : '' }, ev ? `${ev.kind} ${fmtIso(ev.time)}${ev.detail ? ' – ' + ev.detail : ''}` : '–'),
            h('td', { class: 'num' }, String(d.rejected_total)),
            h('td', { class: da.length ? 'bad' : 'muted' }, !tech ? 'not visible to your role' : da.length ? da.map((a) => a.message).join('; ') : 'none'));
        }))
      : h('p', { class: 'muted' }, 'No devices seen yet.'));
}

// ---- start -----------------------------------------------------------------
$('#logout').addEventListener('click', logout);
window.addEventListener('hashchange', route);
route();
