// The WeightWatch tab: plain JavaScript (an ES module TensorBoard loads in an iframe),
// no build step, no network access beyond this plugin's own routes.

const $ = (tag, attrs = {}, ...children) => {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'text') el.textContent = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children) el.append(c);
  return el;
};

const SVG = 'http://www.w3.org/2000/svg';
const svg = (tag, attrs = {}) => {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
};

// Small pixel images (kernel grids) are shown enlarged, without smoothing.
function zoom(img, target = 600) {
  img.addEventListener('load', () => {
    const f = Math.max(1, Math.min(4, Math.floor(target / Math.max(img.naturalWidth, 1))));
    img.style.width = `${img.naturalWidth * f}px`;
  });
  return img;
}

const url = (route, params) => `./${route}?${new URLSearchParams(params)}`;

async function fetchJSON(route, params = {}) {
  const r = await fetch(url(route, params));
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

// Numbers as the library's JSON gives them: floats, or the words NaN, Inf, -Inf.
const WORDS = {'nan': NaN, 'inf': Infinity, '-inf': -Infinity};
const value = (x) => (typeof x === 'string' ? (WORDS[x.toLowerCase()] ?? Number(x)) : x);
function fmt(x) {
  if (x === null || x === undefined) return '—';
  const v = value(x);
  if (!Number.isFinite(v)) return String(x);
  if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
  return v.toPrecision(6);
}

function errorBox(where, err) {
  where.replaceChildren($('div', {class: 'ww-error', text: `Error: ${err.message}`}));
}

function select(options, current, onchange, attrs = {}) {
  const s = $('select', attrs);
  for (const o of options) {
    const opt = $('option', {value: o.value, text: o.label});
    if (o.value === current) opt.selected = true;
    s.append(opt);
  }
  s.addEventListener('change', () => onchange(s.value));
  return s;
}

const state = {runs: [], summaries: new Map()};

async function summary(run) {
  if (!state.summaries.has(run)) state.summaries.set(run, await fetchJSON('run', {run}));
  return state.summaries.get(run);
}

// ------------------------------------------------------------------ run at a glance

function colour(t) {
  // 0 -> pale yellow, 1 -> dark red (log-scaled values are mapped to [0, 1] by the caller)
  const r = 255 - Math.round(80 * t), g = Math.round(245 - 200 * t), b = Math.round(200 - 180 * t);
  return `rgb(${r},${g},${b})`;
}

async function glance(panel) {
  const runSel = select(state.runs.map((r) => ({value: r.name, label: r.name})),
      state.glanceRun, (v) => { state.glanceRun = v; draw(); }, {id: 'ww-glance-run'});
  const metricSel = select([
    {value: 'update', label: 'update ratio (vs previous snapshot)'},
    {value: 'initial', label: 'change since initial'},
  ], state.glanceMetric || 'update', (v) => { state.glanceMetric = v; draw(); });
  const body = $('div');
  const detail = $('div', {class: 'ww-detail', id: 'ww-tensor'});
  panel.replaceChildren($('div', {class: 'ww-controls'}, 'Run ', runSel, ' colour: ', metricSel),
      body, detail);
  async function draw() {
    const run = state.glanceRun || state.runs[0]?.name;
    if (!run) return;
    const top = $('div'), health = $('section', {id: 'ww-health'}), map = $('div'), extra = $('div');
    body.replaceChildren(top, health, map, extra);
    map.replaceChildren($('div', {text: 'loading…'}));
    health.replaceChildren($('div', {class: 'ww-note', text: 'health: checking…'}));
    // The findings are drawn as soon as they come, and marked on the heatmap once both are here.
    const findings = fetchJSON('health', {run}).then((h) => {
      healthList(health, h, (f) => openTensor(detail, run, f.key, f.step_name));
      return h.findings;
    }, (err) => { errorBox(health, err); return []; });
    try {
      let data = await fetchJSON('heatmap', {run, metric: state.glanceMetric || 'update'});
      while (!data.complete) {  // the server reads a bounded amount per request
        heatmap(map, data, run, detail, []);
        data = await fetchJSON('heatmap', {run, metric: 'initial'});
      }
      heatmap(map, data, run, detail, await findings);
      const s = await summary(run);
      if (s.fit && s.fit.length) {  // a search's trial and hyperparameters, the optimizer
        top.replaceChildren($('div', {class: 'ww-controls', id: 'ww-fit',
          text: s.fit.map(([label, text]) => `${label} ${text}`).join(' · ')}));
      }
      if (s.adapters && s.adapters.length) extra.replaceChildren(adaptersTable(s.adapters));
    } catch (err) { errorBox(map, err); }
  }
  await draw();
}

// The run's health findings (`weightwatch doctor`'s): errors first, each with the first thing
// to check; "No finding" when the rules found nothing; the notes (what the run lacks) below.
// Clicking a finding opens its weight at the snapshot that reported it.
function healthList(where, h, open) {
  const count = (n, what) => `${n} ${what}${n === 1 ? '' : 's'}`;
  const title = $('h3', {text: h.healthy ? 'Health: no finding'
    : `Health: ${count(h.errors, 'error')}, ${count(h.warnings, 'warning')}`});
  const parts = [title];
  if (h.healthy) {
    parts.push($('div', {class: 'ww-note', id: 'ww-health-none',
      text: `No finding in the run's ${h.snapshots} snapshots.`}));
  } else {
    const head = $('tr', {}, ...['severity', 'rule', 'layer', 'since step', 'message', 'first check']
        .map((x) => $('th', {text: x})));
    const t = $('table', {class: 'ww-table', id: 'ww-findings'}, head);
    for (const f of h.findings) {
      const steps = `since step ${f.since_name}; reported at ${f.step_name}, last seen at ${f.last_name}`;
      t.append($('tr', {class: 'ww-finding', 'data-severity': f.severity, 'data-rule': f.rule, 'data-key': f.key, title: steps,
        onclick: () => open(f)},
          $('td', {'data-col': 'severity'}, $('span', {class: `ww-badge ww-sev-${f.severity}`, text: f.severity})),
          $('td', {'data-col': 'rule', text: f.rule}), $('td', {'data-col': 'layer', text: f.layer}),
          $('td', {'data-col': 'since', text: f.since_name}),
          $('td', {'data-col': 'message', text: f.message + (f.also.length ? ` (also: ${f.also.join(', ')})` : '')}),
          $('td', {'data-col': 'hint', class: 'ww-hint', text: f.hint})));
    }
    parts.push(t);
    if (h.findings_total > h.findings.length) {
      parts.push($('div', {class: 'ww-note', text: `First ${h.findings.length} of ${h.findings_total} findings.`}));
    }
  }
  if (h.notes.length) parts.push($('div', {class: 'ww-note ww-small', id: 'ww-health-notes', text: `Not checked: ${h.notes.join('; ')}.`}));
  where.replaceChildren(...parts);
}

// Each LoRA layer's update size and its adapters' update ratios; those not training marked.
function adaptersTable(rows) {
  const stalled = rows.filter((a) => a.stalled).map((a) => a.layer);
  const head = $('tr', {}, ...['layer', 'update ‖(α/r)·A·B‖ / ‖base‖', 'A update ratio',
    'B update ratio', 'status'].map((h) => $('th', {text: h})));
  const t = $('table', {class: 'ww-table', id: 'ww-adapters'}, head);
  for (const a of rows) {
    const last = a.update.length ? a.update[a.update.length - 1][1] : null;
    const status = a.stalled ? `NOT TRAINING (not moved for ${a.idle} snapshots)`
      : (a.idle ? `not moved for ${a.idle} snapshots` : 'training');
    t.append($('tr', {class: a.stalled ? 'ww-stalled' : ''},
        $('td', {'data-col': 'name', text: a.layer}), $('td', {'data-col': 'update', text: fmt(last)}),
        $('td', {'data-col': 'a', text: fmt(a.a_ratio)}), $('td', {'data-col': 'b', text: fmt(a.b_ratio)}),
        $('td', {'data-col': 'status', text: status})));
  }
  const note = stalled.length ? `${stalled.length} of ${rows.length} LoRA adapters NOT TRAINING: ` +
    `${stalled.join(', ')} (B still all zeros, or A and B unchanged, for several snapshots).`
    : `${rows.length} LoRA adapters, all moving.`;
  return $('section', {}, $('h3', {text: 'LoRA adapters'}), $('div', {class: 'ww-note', text: note}), t);
}

function heatmap(where, data, run, detail, findings) {
  const cell = Math.max(6, Math.min(28, Math.floor(900 / Math.max(1, data.steps.length))));
  const rowH = 16, left = 180, top = 40;
  const canvas = $('canvas', {id: 'ww-heatmap'});
  canvas.width = left + cell * data.steps.length + 10;
  canvas.height = top + rowH * data.keys.length + 10;
  const ctx = canvas.getContext('2d');
  let lo = Infinity, hi = -Infinity;  // the log10 range of the positive finite values
  for (const row of data.values) {
    for (const x of row) {
      const v = value(x);
      if (Number.isFinite(v) && v > 0) { lo = Math.min(lo, Math.log10(v)); hi = Math.max(hi, Math.log10(v)); }
    }
  }
  if (!Number.isFinite(lo)) { lo = -8; hi = 0; }
  if (hi - lo < 1e-6) lo = hi - 1;
  ctx.font = '11px sans-serif';
  ctx.fillStyle = '#333';
  data.steps.forEach((s, c) => {
    if (data.steps.length < 40 || c % Math.ceil(data.steps.length / 40) === 0) {
      ctx.save(); ctx.translate(left + c * cell + cell / 2, top - 4); ctx.rotate(-Math.PI / 4);
      ctx.fillText(s, 0, 0); ctx.restore();
    }
  });
  const bad = new Set(data.nonfinite.map(([r, c]) => `${r},${c}`));
  data.keys.forEach((k, r) => {
    ctx.fillStyle = '#333';
    ctx.fillText(k.length > 28 ? '…' + k.slice(-27) : k, 4, top + r * rowH + 12);
    data.values[r].forEach((x, c) => {
      const v = value(x), y = top + r * rowH, xpx = left + c * cell;
      if (x === null || Number.isNaN(v)) ctx.fillStyle = '#e6e6e6';  // no value / undefined
      else if (!Number.isFinite(v)) ctx.fillStyle = '#000';
      else ctx.fillStyle = colour(v <= 0 ? 0 : Math.max(0, (Math.log10(v) - lo) / (hi - lo || 1)));
      ctx.fillRect(xpx, y, cell - 1, rowH - 1);
      if (bad.has(`${r},${c}`)) {  // NaN / Inf in the tensor: a black cross
        ctx.strokeStyle = '#000'; ctx.beginPath();
        ctx.moveTo(xpx, y); ctx.lineTo(xpx + cell - 1, y + rowH - 1);
        ctx.moveTo(xpx + cell - 1, y); ctx.lineTo(xpx, y + rowH - 1); ctx.stroke();
      }
    });
  });
  canvas.addEventListener('click', (ev) => {
    const rect = canvas.getBoundingClientRect();
    const c = Math.floor((ev.clientX - rect.left - left) / cell);
    const r = Math.floor((ev.clientY - rect.top - top) / rowH);
    if (r >= 0 && r < data.keys.length && c >= 0 && c < data.steps.length) {
      openTensor(detail, run, data.keys[r], data.steps[c]);
    }
  });
  canvas.addEventListener('mousemove', (ev) => {
    const rect = canvas.getBoundingClientRect();
    const c = Math.floor((ev.clientX - rect.left - left) / cell);
    const r = Math.floor((ev.clientY - rect.top - top) / rowH);
    const inside = r >= 0 && r < data.keys.length && c >= 0 && c < data.steps.length;
    const found = inside ? findings.filter((f) => f.key === data.keys[r] && f.column === data.steps[c]) : [];
    canvas.title = inside ? `${data.keys[r]} @ ${data.steps[c]}: ${fmt(data.values[r][c])}` +
      found.map((f) => `\n${f.rule} (${f.severity}): ${f.message}`).join('') : '';
  });
  const marks = findingMarks(data, findings, {cell, rowH, left, top});
  const legend = $('div', {class: 'ww-note', text:
    `Colour: ${data.metric === 'update' ? '‖Wₜ − Wₜ₋₁‖ / ‖Wₜ₋₁‖' : '‖Wₜ − W₀‖ / ‖W₀‖'}` +
    ` on a log scale from ${fmt(10 ** lo)} (pale) to ${fmt(10 ** hi)} (dark red); black: ` +
    'infinite; grey: no value (the first snapshot, or a tensor that was all zeros); a cross: ' +
    'the tensor holds NaN/Inf' + (marks.length ? '; a ringed cell with a dot: a health finding ' +
    'reported at that snapshot (red: error, orange: warning; hover the cell for the rule)' : '') +
    '. Click a cell to open that tensor at that step.' + (data.complete ? '' : ' (still reading…)')});
  where.replaceChildren(legend, $('div', {class: 'ww-heatmap-box'}, canvas, ...marks));
}

// One mark per finding on its weight's row, in the column of the snapshot that reported it:
// a ring and a dot over the cell. The marks let the pointer through to the canvas, whose
// tooltip names the cell's findings and whose click opens the cell's tensor.
function findingMarks(data, findings, {cell, rowH, left, top}) {
  const marks = [];
  for (const f of findings) {
    const r = data.keys.indexOf(f.key), c = data.steps.indexOf(f.column);
    if (r < 0 || c < 0) continue;
    const w = Math.max(cell - 1, 10) + 4, cx = left + c * cell + (cell - 1) / 2;
    const mark = $('div', {class: `ww-mark ww-sev-${f.severity}`, 'data-rule': f.rule, 'data-key': f.key,
      'data-step': f.column, title: `${f.rule} (${f.severity}) in ${f.layer} at step ${f.step_name}: ${f.message}`,
      style: `left:${cx - w / 2}px;top:${top + r * rowH - 2}px;width:${w}px;height:${rowH + 3}px`},
    $('span', {class: 'ww-dot'}));
    marks.push(mark);
  }
  return marks;
}

async function openTensor(where, run, key, step) {
  where.replaceChildren($('div', {text: 'loading…'}));
  try {
    const t = await fetchJSON('tensor', {run, key, step});
    const route = t.conv ? 'kernel.png' : 'tensor.png';
    const stats = $('table', {class: 'ww-table'});
    for (const [k, v] of Object.entries(t.stats)) stats.append($('tr', {}, $('th', {text: k}), $('td', {text: fmt(v)})));
    where.replaceChildren(
        $('h3', {text: `${key} at step ${t.step} (${t.dtype}[${t.shape.join(', ')}])`}),
        zoom($('img', {src: url(route, {run, key, step}), class: 'ww-pixels'})),
        $('div', {class: 'ww-note', text: t.conv ? 'kernel grid, as the kernel images view draws it'
            : `rows × last axis, every ${t.strides.join(' × ')} value; ±${fmt(t.vmax)} full colour`}),
        stats);
  } catch (err) { errorBox(where, err); }
}

// ------------------------------------------------------------------ compare

const COLUMNS = [
  ['name', 'tensor'], ['status', 'status'], ['rel_l2', 'rel-L2'], ['cosine', 'cosine'],
  ['matched_cosine', 'matched cosine'], ['max_abs', 'max |Δ|'], ['units_moved', 'units moved'],
];

async function comparePanel(panel) {
  const runs = state.runs.map((r) => ({value: r.name, label: r.name}));
  // By default: the first run's initial weights against its last snapshot (always comparable).
  const c = state.compare ||= {a: runs[0]?.value, b: runs[0]?.value, sa: 'initial', sb: 'last'};
  const stepSel = async (run, cur, id, set) => {
    const s = await summary(run);
    const opts = [{value: 'last', label: 'last'}].concat(s.steps.map((x) => ({value: x.name, label: x.name})));
    if (!opts.some((o) => o.value === cur)) set('last');
    return select(opts, cur, set, {id});
  };
  const out = $('div', {id: 'ww-compare-out'});
  async function controls() {
    const row = $('div', {class: 'ww-controls'},
        'A ', select(runs, c.a, (v) => { c.a = v; c.sa = 'last'; controls(); }, {id: 'ww-a'}),
        ' @ ', await stepSel(c.a, c.sa, 'ww-sa', (v) => { c.sa = v; }),
        '  B ', select(runs, c.b, (v) => { c.b = v; c.sb = 'last'; controls(); }, {id: 'ww-b'}),
        ' @ ', await stepSel(c.b, c.sb, 'ww-sb', (v) => { c.sb = v; }),
        ' ', $('button', {id: 'ww-compare-go', text: 'Compare', onclick: run}));
    panel.replaceChildren(row, out);
  }
  async function run() {
    out.replaceChildren($('div', {text: 'comparing…'}));
    try {
      const d = await fetchJSON('compare', {a: c.a, sa: c.sa, b: c.b, sb: c.sb});
      showDiff(out, d, c);
    } catch (err) { errorBox(out, err); }
  }
  await controls();
}

function showDiff(out, d, c) {
  const counts = Object.entries(d.counts).map(([k, v]) => `${k} ${v}`).join(', ');
  const table = $('table', {class: 'ww-table', id: 'ww-compare-table'});
  const head = $('tr');
  let sortKey = null, asc = true;
  COLUMNS.forEach(([k, label]) => head.append($('th', {text: label, 'data-col': k, onclick: () => {
    asc = sortKey === k ? !asc : true; sortKey = k; body();
  }})));
  table.append($('thead', {}, head));
  const tbody = $('tbody');
  table.append(tbody);
  const body = () => {
    const rows = [...d.tensors];
    if (sortKey) {
      rows.sort((x, y) => {
        const a = x[sortKey], b = y[sortKey];
        const na = typeof a === 'number' || typeof a === 'string' && !isNaN(value(a)) ? value(a) : a;
        const nb = typeof b === 'number' || typeof b === 'string' && !isNaN(value(b)) ? value(b) : b;
        const r = (na === null) - (nb === null) || (na < nb ? -1 : na > nb ? 1 : 0);
        return asc ? r : -r;
      });
    }
    tbody.replaceChildren(...rows.map((t) => $('tr', {'data-key': t.name, class: `ww-${t.status}`},
        ...COLUMNS.map(([k]) => $('td', {'data-col': k,
          text: k === 'name' || k === 'status' ? t[k] : fmt(t[k])})))));
  };
  body();
  const kernels = $('div', {id: 'ww-compare-kernels'});
  for (const key of d.conv) {
    const q = {a: c.a, sa: c.sa, b: c.b, sb: c.sb, key};
    const fig = (which, label) => {
      const cap = $('figcaption', {text: label});
      fetchJSON('compare_kernel', {...q, which}).then((m) => {
        cap.textContent = `${label} (±${fmt(m.vmax)})` +
          (which === 'b' ? (m.matched ? ', units matched to A' : ', not reordered') : '');
      }).catch((e) => { cap.textContent = `${label}: ${e.message}`; });
      return $('figure', {}, zoom($('img', {src: url('compare_kernel.png', {...q, which}), class: 'ww-pixels'}), 420), cap);
    };
    kernels.append($('h3', {text: key}), $('div', {class: 'ww-row'},
        fig('a', 'A'), fig('b', 'B'), fig('diff', 'B − A')));
  }
  out.replaceChildren(
      $('div', {class: 'ww-note', text: `${d.a} vs ${d.b}: ${counts}. Numbers are diff_runs' own; ` +
        'click a column to sort.' + (d.tensors_total > d.tensors.length
          ? ` First ${d.tensors.length} of ${d.tensors_total} tensors.` : '')}),
      table, kernels);
}

// ------------------------------------------------------------------ kernels through training

async function kernelsPanel(panel) {
  const withConv = [];
  for (const r of state.runs) {
    try {
      const s = await summary(r.name);
      if (s.weights.some((w) => w.conv)) withConv.push(s);
    } catch (err) { /* a damaged run: shown in its own error, skipped here */ }
  }
  if (!withConv.length) { panel.replaceChildren($('div', {text: 'No run has convolution kernels.'})); return; }
  const k = state.kernels ||= {run: withConv[0].name, key: null, index: null};
  const view = $('div');
  async function draw() {
    const s = await summary(k.run);
    const keys = s.weights.filter((w) => w.conv).map((w) => w.key);
    if (!keys.includes(k.key)) k.key = keys[0];
    if (k.index === null || k.index >= s.steps.length) k.index = s.steps.length - 1;
    const label = $('span', {id: 'ww-kernel-step'});
    const img = zoom($('img', {id: 'ww-kernel-img', class: 'ww-pixels'}));
    const scale = $('div', {class: 'ww-colorbar'});
    const slider = $('input', {type: 'range', min: 0, max: s.steps.length - 1, value: k.index,
      id: 'ww-kernel-slider'});
    const responses = $('div', {id: 'ww-responses'});
    const show = async () => {
      const step = s.steps[k.index].name;
      label.textContent = `step ${step}`;
      label.dataset.step = step;
      img.src = url('kernel.png', {run: k.run, key: k.key, step});
      const [m, r] = await Promise.all([fetchJSON('kernel', {run: k.run, key: k.key, step}),
        fetchJSON('responses', {run: k.run, key: k.key, step}).catch((e) => ({error: e}))]);
      if (label.dataset.step !== step) return;  // the slider moved on meanwhile
      scale.replaceChildren($('span', {text: fmt(-m.vmax)}),
          $('img', {src: url('colorbar.png', {}), class: 'ww-bar'}), $('span', {text: fmt(m.vmax)}),
          $('span', {class: 'ww-note', text: ` ${m.tiles} of ${m.total} tiles, ${m.scale} px per weight` +
            (m.rgb ? ', RGB tiles (3 input channels)' : '')}));
      img.dataset.loadedStep = step;
      showResponses(responses, r, k, step);
    };
    slider.addEventListener('input', () => { k.index = Number(slider.value); show(); });
    view.replaceChildren($('div', {class: 'ww-controls'},
        'Run ', select(withConv.map((x) => ({value: x.name, label: x.name})), k.run,
            (v) => { k.run = v; k.index = null; draw(); }, {id: 'ww-kernel-run'}),
        ' layer ', select(keys.map((x) => ({value: x, label: x})), k.key,
            (v) => { k.key = v; draw(); }, {id: 'ww-kernel-key'}),
        ' ', slider, ' ', label), scale, img, responses);
    await show();
  }
  panel.replaceChildren(view);
  await draw();
}

// The sample images' responses to the kernel at this step: the stored images, filtered
// with the snapshot's kernel by the server (the responses view's own functions).
function showResponses(where, r, k, step) {
  if (r.error) { errorBox(where, r.error); return; }
  if (!r.available) {
    where.replaceChildren($('div', {class: 'ww-note', id: 'ww-responses-none', text: `No responses: ${r.reason}.`}));
    return;
  }
  const figs = r.samples.map((x) => {
    const im = zoom($('img', {class: 'ww-pixels ww-response', 'data-sample': x.index,
      src: url('responses.png', {run: k.run, key: k.key, step, sample: x.index})}), 900);
    return $('figure', {}, im, $('figcaption', {text:
      `sample ${x.index}, then its response to each of the ${r.outputs} kernels (${x.tiles} shown); ` +
      `each tile on its own contrast: white at its mean, full colour at mean ± scale ` +
      `(scales ${fmt(Math.min(...x.scales))} to ${fmt(Math.max(...x.scales))})`}));
  });
  where.replaceChildren($('h3', {text: `Sample images filtered by ${r.key} at step ${step}`}),
      $('div', {class: 'ww-note', text: 'Cross-correlation of each stored sample image with each ' +
        'kernel (the layer\'s padding, strides and dilation; no bias, no activation), drawn at the ' +
        'image\'s size; blue below the tile\'s mean, red above; grey: no output covers the pixel.' +
        (r.shown < r.total ? ` First ${r.shown} of ${r.total} images.` : '')}), ...figs);
  where.dataset.loadedStep = step;
}

// ------------------------------------------------------------------ features

const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#e377c2',
  '#17becf', '#7f7f7f', '#bcbd22'];
const DASHES = ['', '6 3', '2 2', '8 3 2 3'];

async function featuresPanel(panel) {
  const data = [];
  for (const r of state.runs) {
    try {
      const f = await fetchJSON('features', {run: r.name});
      if (f.available) data.push({run: r.name, ...f});
    } catch (err) { /* damaged runs show their error elsewhere */ }
  }
  if (!data.length) { panel.replaceChildren($('div', {text: 'No run was written with feature_names.'})); return; }
  const chosen = state.featureRuns ||= new Set([data[0].run]);
  const view = $('div');
  const boxes = $('div', {class: 'ww-controls'}, 'Runs: ', ...data.map((d) => {
    const cb = $('input', {type: 'checkbox', class: 'ww-features-run', 'data-run': d.run});
    cb.checked = chosen.has(d.run);
    cb.addEventListener('change', () => { cb.checked ? chosen.add(d.run) : chosen.delete(d.run); draw(); });
    return $('label', {}, cb, ` ${d.run} `);
  }));
  let index = null;
  function draw() {
    const shown = data.filter((d) => chosen.has(d.run));
    if (!shown.length) { view.replaceChildren(); return; }
    const first = shown[0];
    if (index === null || index >= first.steps.length) index = first.steps.length - 1;
    const top = first.tables[index].map((r) => r.name);
    const W = 720, H = 300, L = 50, B = 30;
    const all = shown.flatMap((d) => d.names.map((n, i) => top.includes(n) ? d.weights[i] : []).flat())
        .map(value).filter(Number.isFinite);
    const lo = Math.min(0, ...all), hi = Math.max(0, ...all);
    const n = Math.max(...shown.map((d) => d.steps.length));
    const xs = (i) => L + (W - L - 10) * (n > 1 ? i / (n - 1) : 0.5);
    const ys = (v) => 10 + (H - B - 10) * (hi - v) / (hi - lo || 1);
    const chart = svg('svg', {width: W, height: H, id: 'ww-features-chart'});
    chart.append(svg('line', {x1: L, x2: W - 10, y1: ys(0), y2: ys(0), stroke: '#999'}));
    for (const v of [lo, hi]) {
      const t = svg('text', {x: 4, y: ys(v) + 4, 'font-size': 11}); t.textContent = fmt(v); chart.append(t);
    }
    shown.forEach((d, ri) => top.forEach((name, fi) => {
      const i = d.names.indexOf(name);
      if (i < 0) return;
      const pts = d.weights[i].map((v, t) => [xs(t), ys(value(v))]).filter(([, y]) => Number.isFinite(y));
      chart.append(svg('polyline', {points: pts.map((p) => p.join(',')).join(' '), fill: 'none',
        stroke: PALETTE[fi % PALETTE.length], 'stroke-width': 2, 'stroke-dasharray': DASHES[ri % DASHES.length]}));
      const pair = (d.partners || {})[name];
      if (pair && pts.length) {  // a correlated partner: marked at the line's last point
        const [x, y] = pts[pts.length - 1];
        const mark = svg('text', {x: x - 4, y: y - 6, 'font-size': 11, 'text-anchor': 'end',
          fill: PALETTE[fi % PALETTE.length], class: 'ww-partner-mark', 'data-feature': name});
        mark.textContent = `↔ ${pair[0]}`;
        chart.append(mark);
      }
    }));
    first.steps.forEach((st, t) => {
      if (first.steps.length <= 20 || t % Math.ceil(first.steps.length / 20) === 0) {
        const lab = svg('text', {x: xs(t), y: H - B + 16, 'font-size': 11, 'text-anchor': 'middle'});
        lab.textContent = st; chart.append(lab);
      }
    });
    const cursor = svg('line', {x1: xs(index), x2: xs(index), y1: 5, y2: H - B, stroke: '#444', 'stroke-dasharray': '3 3'});
    chart.append(cursor);
    const partners = first.partners || {};  // feature -> [partner, r] (stored feature_data)
    const legend = $('div', {class: 'ww-note', id: 'ww-features-legend'}, ...top.map((name, fi) =>
      $('span', {style: `color:${PALETTE[fi % PALETTE.length]}`, 'data-feature': name,
        text: `■ ${name}${partners[name] ? ` ↔ ${partners[name][0]} (r ${fmt(partners[name][1])})` : ''}  `})),
      ...shown.map((d, ri) => $('span', {text: ` ${['solid', 'dashed', 'dotted', 'dash-dot'][ri % 4]}: ${d.run} `})));
    const slider = $('input', {type: 'range', min: 0, max: first.steps.length - 1, value: index, id: 'ww-features-slider'});
    slider.addEventListener('input', () => { index = Number(slider.value); draw(); });
    const tables = $('div', {class: 'ww-row'}, ...shown.map((d) => {
      const head = $('tr', {}, $('th', {text: 'rank'}), $('th', {text: 'feature'}), $('th', {text: 'weight'}));
      if (d.partners) head.append($('th', {text: 'correlated with (r)'}));
      const t = $('table', {class: 'ww-table ww-features-table', 'data-run': d.run}, head);
      const step = first.steps[index], j = d.steps.indexOf(step);
      if (j >= 0) {
        for (const r of d.tables[j]) {
          const row = $('tr', {'data-feature': r.name}, $('td', {text: r.rank}), $('td', {text: r.name}), $('td', {text: fmt(r.weight)}));
          if (d.partners) {
            row.append($('td', {'data-col': 'partner', class: r.partner ? 'ww-partner' : '',
              text: r.partner ? `${r.partner} (${fmt(r.correlation)})` : ''}));
          }
          t.append(row);
        }
      }
      const pf = d.partners_from;
      const note = !pf ? '' : `Correlated with: the feature whose |r| with it is ${pf.threshold} or more ` +
        `in the stored feature data (${pf.rows < pf.rows_total ? `the first ${pf.rows} of ${pf.rows_total}`
          : pf.rows} samples)` + (Object.keys(d.partners).length ? '.' : '; no two features are.');
      return $('figure', {}, $('figcaption', {text: `${d.run} @ ${step}`}), t,
          $('div', {class: 'ww-note', text: note}));
    }));
    view.replaceChildren($('div', {class: 'ww-controls'}, 'step ', slider, ` ${first.steps[index]}`),
        legend, chart, tables);
  }
  panel.replaceChildren(boxes, view);
  draw();
}

// ------------------------------------------------------------------ page

const PANELS = [['glance', 'Run at a glance', glance], ['compare', 'Compare', comparePanel],
  ['kernels', 'Kernels through training', kernelsPanel], ['features', 'Features', featuresPanel]];

export async function render() {
  document.head.append($('link', {rel: 'stylesheet', href: './static/style.css'}));
  const nav = $('nav', {class: 'ww-nav'});
  const panel = $('main', {id: 'ww-panel'});
  const runsNote = $('div', {class: 'ww-note', id: 'ww-runs'});
  document.body.replaceChildren($('header', {}, $('h2', {text: 'WeightWatch'}), runsNote), nav, panel);
  let current = 'glance';
  const open = async (name) => {
    current = name;
    for (const b of nav.children) b.classList.toggle('ww-active', b.dataset.panel === name);
    panel.replaceChildren($('div', {text: 'loading…'}));
    try { await PANELS.find((p) => p[0] === name)[2](panel); } catch (err) { errorBox(panel, err); }
  };
  for (const [name, label] of PANELS) nav.append($('button', {'data-panel': name, id: `ww-tab-${name}`, text: label, onclick: () => open(name)}));
  nav.append($('button', {text: '↻ refresh', id: 'ww-refresh', onclick: async () => { await loadRuns(); open(current); }}));
  async function loadRuns() {
    const r = await fetchJSON('runs');
    state.runs = r.runs;
    state.summaries.clear();  // new snapshots show on refresh
    runsNote.textContent = `${r.runs.length} run${r.runs.length === 1 ? '' : 's'} in the log directory` +
      (r.truncated ? ' (list cut)' : '');
  }
  try { await loadRuns(); } catch (err) { errorBox(panel, err); return; }
  await open('glance');
}
