// The composition playground. Plain ES module, no build step.
// The admin token lives in sessionStorage and travels only in the
// Authorization header, never in a URL.
import { lineOf, lineOfMessage } from '/ui/yaml-lines.js';

const $ = id => document.getElementById(id);
const state = { mode: null, config: null, name: null, etag: null, loaded: null, draft: null, valid: false, pattern: '' };

class Unauthorized extends Error {}

async function api(method, path, { body, json, headers = {}, accept } = {}) {
  const h = { ...headers };
  const token = sessionStorage.getItem('manifold-admin-token');
  if (token) h['Authorization'] = 'Bearer ' + token;
  if (accept) h['Accept'] = accept;
  let payload = body;
  if (json !== undefined) { h['Content-Type'] = 'application/json'; payload = JSON.stringify(json); }
  const resp = await fetch(path, { method, headers: h, body: payload });
  if (resp.status === 401) { showLogin('The admin API needs a token.'); throw new Unauthorized(); }
  return resp;
}

function showLogin(msg) {
  $('login').hidden = false;
  $('app').hidden = true;
  $('login-error').textContent = msg || '';
}

$('login-form').addEventListener('submit', ev => {
  ev.preventDefault();
  sessionStorage.setItem('manifold-admin-token', $('token').value);
  $('token').value = '';
  start();
});

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v; else if (k.startsWith('on')) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}

async function refreshStatus() {
  const status = await (await api('GET', '/status')).json();
  state.mode = status.mode;
  $('mode').textContent = `${status.mode} · node ${status.node_id} · config v${status.config_version}`;
}

async function start() {
  try {
    await refreshStatus();
    state.config = await (await api('GET', '/config')).json();
  } catch (e) {
    if (!(e instanceof Unauthorized)) showLogin(String(e));
    return;
  }
  $('login').hidden = true;
  $('app').hidden = false;
  renderLists();
  if (state.name) openComposition(state.name);
}

function policiesOf(e) { return (e.policies || []).length ? ' · ' + e.policies.join(', ') : ''; }

function renderLists() {
  const comps = $('compositions'), routes = $('routes');
  comps.replaceChildren(...(state.config.compositions || []).map(c =>
    el('li', {}, el('a', { href: '#', 'data-composition': c.name, onclick: ev => { ev.preventDefault(); openComposition(c.name); } }, c.name),
      el('small', {}, ` ${c.method || 'GET'} ${c.path}${policiesOf(c)}`))));
  routes.replaceChildren(...(state.config.routes || []).map(r =>
    el('li', {}, el('b', {}, r.name), el('small', {}, ` ${(r.methods || []).join(',') || '*'} ${r.path} → ${r.upstream}${policiesOf(r)}`))));
}

async function openComposition(name) {
  let resp;
  try { resp = await api('GET', `/compositions/${encodeURIComponent(name)}/yaml`, { accept: 'application/yaml' }); } catch { return; }
  if (!resp.ok) { alert(`cannot open ${name}: ${resp.status}`); return; }
  state.name = name;
  state.etag = resp.headers.get('ETag');
  const text = await resp.text();
  state.loaded = (state.config.compositions || []).find(c => c.name === name) || null;
  $('placeholder').hidden = true;
  $('editor-pane').hidden = false;
  $('result').hidden = true;
  $('diff').hidden = true;
  $('title').textContent = name;
  $('yaml').value = text;
  setupRequest(state.loaded);
  renderLines([]);
  validateNow();
}

function setupRequest(c) {
  state.pattern = c ? c.path : '';
  $('method').value = (c && c.method) || 'GET';
  $('path-pattern').textContent = state.pattern;
  const names = [...state.pattern.matchAll(/\{\*?([^}]+)\}/g)].map(m => m[1]);
  $('params').replaceChildren(...names.map(n => el('label', {}, `{${n}} `, el('input', { 'data-param': n, value: '1', size: 10 }))));
}

// --- editor: line numbers, errors at their line -----------------------------

function renderLines(marks) {
  const text = $('yaml').value;
  const count = text.split('\n').length;
  const byLine = new Map();
  for (const m of marks) byLine.set(m.line, [...(byLine.get(m.line) || []), m]);
  const gutter = [], mirror = [];
  for (let i = 1; i <= count; i++) {
    const ms = byLine.get(i);
    gutter.push(el('div', { class: ms ? 'num error' : 'num' }, String(i)));
    const row = el('div', { class: ms ? 'line error' : 'line', 'data-line': String(i) });
    if (ms) row.append(el('span', { class: 'msg' }, ms.map(m => m.message).join(' · ')));
    mirror.push(row);
  }
  $('gutter').replaceChildren(...gutter);
  $('mirror').replaceChildren(...mirror);
  syncScroll();
}

function syncScroll() {
  const t = $('yaml');
  $('gutter').scrollTop = t.scrollTop;
  $('mirror').style.transform = `translate(${-t.scrollLeft}px, ${-t.scrollTop}px)`;
}

$('yaml').addEventListener('scroll', syncScroll);
let timer = null;
$('yaml').addEventListener('input', () => {
  renderLines(state.marks || []);
  clearTimeout(timer);
  timer = setTimeout(validateNow, 300);
});
$('yaml').addEventListener('keydown', ev => {
  if (ev.key === 'Tab') {
    ev.preventDefault();
    const t = ev.target, s = t.selectionStart;
    t.setRangeText('  ', s, t.selectionEnd, 'end');
    t.dispatchEvent(new Event('input'));
  }
});

let seq = 0;
async function validateNow() {
  const mine = ++seq;
  const text = $('yaml').value;
  let resp;
  try { resp = await api('POST', `/compositions/${encodeURIComponent(state.name)}/validate`, { body: text, headers: { 'Content-Type': 'application/yaml' } }); } catch { return; }
  const out = await resp.json();
  if (mine !== seq) return;
  state.valid = !!out.valid;
  state.draft = out.composition;
  const prefix = `compositions.${state.name}`;
  const marks = Object.entries(out.fields || {}).map(([path, message]) => ({
    path, message,
    line: (path === prefix || path === '(document)') ? (lineOfMessage(message) || 1) : lineOf(text, path, prefix),
  }));
  state.marks = marks;
  renderLines(marks);
  $('validity').textContent = out.valid ? '✓ valid' : `✗ ${marks.length} error${marks.length === 1 ? '' : 's'}`;
  $('validity').className = out.valid ? 'ok' : 'bad';
  $('errors').replaceChildren(...marks.map(m => el('li', { 'data-path': m.path, 'data-line': String(m.line) },
    el('a', { href: '#', onclick: ev => { ev.preventDefault(); gotoLine(m.line); } }, `line ${m.line}`), ` ${m.path}: ${m.message}`)));
  $('run').disabled = false;
}

function gotoLine(n) {
  const t = $('yaml');
  const lines = t.value.split('\n');
  const start = lines.slice(0, n - 1).reduce((a, l) => a + l.length + 1, 0);
  t.focus();
  t.setSelectionRange(start, start + (lines[n - 1] || '').length);
}

// --- try and the waterfall ----------------------------------------------------

function requestPath() {
  let p = state.pattern;
  for (const input of $('params').querySelectorAll('input')) {
    const n = input.dataset.param;
    p = p.replace(new RegExp(`\\{\\*?${n.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\}`), encodeURIComponent(input.value).replace(/%2F/g, '/'));
  }
  return p;
}

function parseHeaders(text) {
  const h = {};
  for (const line of text.split('\n')) {
    const i = line.indexOf(':');
    if (i > 0) h[line.slice(0, i).trim()] = line.slice(i + 1).trim();
  }
  return h;
}

$('request').addEventListener('submit', async ev => {
  ev.preventDefault();
  let body = null;
  const bt = $('body').value.trim();
  if (bt) { try { body = JSON.parse(bt); } catch { body = bt; } }
  const req = { method: $('method').value || undefined, path: requestPath(), query: $('query').value || null, headers: parseHeaders($('headers').value), body, composition: $('yaml').value };
  let resp;
  try { resp = await api('POST', `/compositions/${encodeURIComponent(state.name)}/try`, { json: req }); } catch { return; }
  const out = await resp.json();
  $('result').hidden = false;
  if (!resp.ok) {
    $('resp-status').textContent = `try failed: ${resp.status}`;
    $('resp-headers').textContent = '';
    $('resp-body').textContent = JSON.stringify(out, null, 2);
    $('waterfall').replaceChildren();
    return;
  }
  $('resp-status').textContent = String(out.response.status);
  $('resp-status').className = out.response.status < 400 ? 'ok' : 'bad';
  $('resp-headers').textContent = Object.entries(out.response.headers).map(([k, v]) => `${k}: ${v}`).join('\n');
  $('resp-body').textContent = typeof out.response.body === 'string' ? out.response.body : JSON.stringify(out.response.body, null, 2);
  renderWaterfall(out.calls || []);
});

// The path and query a call was sent to (the origin is the config's).
function shortUrl(url) {
  try { const u = new URL(url); return u.pathname + u.search; } catch { return url || ''; }
}

function renderWaterfall(calls) {
  const end = Math.max(1, ...calls.map(c => (c.started_ms || 0) + (c.duration_ms || 0)));
  // By start time; calls that never started (when was false) last.
  const ordered = calls.map((c, i) => [c, i]).sort(([a, i], [b, j]) =>
    (a.started_ms ?? Infinity) - (b.started_ms ?? Infinity) || i - j).map(([c]) => c);
  const rows = ordered.map(c => {
    const left = ((c.started_ms || 0) / end) * 100;
    const width = Math.max(0.5, ((c.duration_ms || 0) / end) * 100);
    // `when` false is not a failure (nor are the calls that read it): grey, not red.
    const notRun = c.error && c.error.kind === 'not_run';
    const failed = !notRun && (c.error || (c.status && c.status >= 400));
    const label = [notRun ? 'not run' : (c.status ?? (c.error ? 'error' : 'skipped')), !notRun && c.duration_ms != null ? `${c.duration_ms.toFixed(1)} ms` : '',
      c.retries ? `${c.retries} retr${c.retries === 1 ? 'y' : 'ies'}` : '', c.cache ? `cache ${c.cache}` : '',
      c.url ? shortUrl(c.url) : ''].filter(Boolean).join(' · ');
    const err = c.error ? (typeof c.error === 'string' ? c.error : (c.error.message || JSON.stringify(c.error))) : '';
    return el('div', { class: 'wf-row' + (failed ? ' failed' : '') + (notRun ? ' notrun' : ''), 'data-call': c.name, 'data-status': String(c.status ?? '') },
      el('div', { class: 'wf-name', title: c.url || '' }, c.name),
      el('div', { class: 'wf-track' },
        Object.assign(el('div', { class: 'wf-bar' }), { style: `left:${left}%;width:${width}%` }),
        // The label after the bar, or before it when the bar ends near the right edge.
        el('span', { class: 'wf-label', style: left + width > 65 ? `right:${100 - left}%;margin-right:6px` : `left:${left + width}%;margin-left:6px` },
          label + (err ? ` · ${err}` : ''))));
  });
  const axis = el('div', { class: 'wf-row axis' }, el('div', { class: 'wf-name' }, ''), el('div', { class: 'wf-track' }, `0 … ${end.toFixed(1)} ms`));
  $('waterfall').replaceChildren(axis, ...rows);
}

// --- apply: diff first, then the write ---------------------------------------

let pending = null;

$('apply').addEventListener('click', async () => {
  await validateNow();
  if (!state.valid) { alert('Fix the errors first.'); return; }
  const draft = state.draft;
  $('diff').hidden = false;
  $('applied').textContent = '';
  try {
    // The diff is the dry run of the whole config with the draft in place,
    // in both modes: the fields that change, before and after.
    const current = await (await api('GET', '/config')).json();
    const list = current.compositions || (current.compositions = []);
    const i = list.findIndex(c => c.name === state.name);
    if (i >= 0) list[i] = draft; else list.push(draft);
    const dry = await api('POST', '/config?dry_run=true', { json: current });
    const out = await dry.json();
    const changes = dry.ok ? out.changes : out;
    const lines = [];
    for (const [key, mark] of [['created', '+'], ['updated', '~'], ['deleted', '-']]) {
      for (const e of (changes[key] || [])) {
        lines.push(`${mark} ${e.kind}/${e.name}`);
        for (const f of (e.fields || [])) {
          lines.push(`    ${f.path}: ${'before' in f ? JSON.stringify(f.before) : '(absent)'} → ${'after' in f ? JSON.stringify(f.after) : '(removed)'}`);
        }
      }
    }
    $('diff-text').textContent = dry.ok ? (lines.join('\n') || 'no change') : JSON.stringify(out, null, 2);
    if (!dry.ok) {
      pending = null;
    } else if (state.mode === 'database') {
      if (state.etag) $('diff-text').textContent += `\n\n(written with If-Match ${state.etag}, the version you opened)`;
      pending = () => api('PUT', `/compositions/${encodeURIComponent(state.name)}`, { json: draft, headers: state.etag ? { 'If-Match': state.etag } : {} });
    } else {
      pending = () => api('POST', '/config', { json: current });
    }
  } catch { /* token asked */ }
});

$('confirm').addEventListener('click', async () => {
  if (!pending) return;
  let resp;
  try { resp = await pending(); } catch { return; }
  const out = await resp.json().catch(() => ({}));
  if (resp.ok) {
    // DB-less: the node's config lives in memory; the files are read at start.
    $('applied').textContent = state.mode === 'database' ? 'applied ✓ (stored in the database)'
      : `applied ✓ (config v${out.version}) · in memory only: copy the YAML into your config files, or a restart loses it`;
    $('applied').className = 'ok';
    if (resp.headers.get('ETag')) state.etag = resp.headers.get('ETag');
    pending = null;
    state.config = await (await api('GET', '/config')).json();
    state.loaded = (state.config.compositions || []).find(c => c.name === state.name) || null;
    renderLists();
    await refreshStatus();
  } else {
    $('applied').textContent = `failed: ${resp.status} ${out.message || ''}` +
      (resp.status === 412 ? ' · someone changed it since you opened it: copy your draft, reopen the composition, and apply again' : '');
    $('applied').className = 'bad';
  }
});
$('cancel').addEventListener('click', () => { $('diff').hidden = true; pending = null; });

start();
