// Small DOM helpers: elements from data, never from HTML strings.

/** h('tag.class', {attr: value, onclick: fn}, ...children) */
export function h(tag, attrs, ...children) {
  const [name, ...classes] = tag.split('.');
  const el = document.createElement(name || 'div');
  if (classes.length) el.className = classes.join(' ');
  if (attrs) {
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
      else if (key === 'class') el.className = [el.className, value].filter(Boolean).join(' ');
      else if (key === 'dataset') Object.assign(el.dataset, value);
      else if (key === 'text') el.textContent = value;
      else if (value === true) el.setAttribute(key, '');
      else el.setAttribute(key, String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function badge(text, kind = String(text).toLowerCase()) {
  return h('span.badge', { class: kind.replace(/[^a-z_]/g, '_') }, text);
}

function notice(kind, title, detail) {
  return h('div.notice', { class: kind, role: kind === 'error' ? 'alert' : 'status' },
    h('strong', null, title), detail ? h('div', null, detail) : null);
}

/** A visible error: what failed and the server's reason. */
export function errorNotice(err, what = 'Loading failed') {
  const detail = err && err.path
    ? `${err.path}: ${err.status ? `HTTP ${err.status}` : 'no answer'} — ${err.detail}`
    : String(err && err.message ? err.message : err);
  return notice('error', what, detail);
}

export function emptyNotice(text, detail) {
  return notice('empty', text, detail);
}

/** For endpoints this node does not serve (yet). */
export function unavailableNotice(what, err) {
  return notice('unavailable', `${what} not available on this node`,
    `This node does not serve ${err && err.path ? err.path : 'that endpoint'}${err && err.detail && !err.unavailable ? ` (${err.detail})` : ''}.`);
}

export function successNotice(text) {
  return notice('ok', text);
}

/**
 * A table: columns are {title, cell: row => node|string}; options.onclick(row) makes rows
 * clickable links; options.empty is shown when there are no rows.
 */
export function table(columns, rows, options = {}) {
  if (!rows.length) return emptyNotice(options.empty || 'Nothing here yet.');
  const body = rows.map((row, index) => {
    const tr = h('tr', options.rowAttrs ? options.rowAttrs(row) : null,
      columns.map((c) => h('td', null, c.cell(row, index))));
    if (options.onclick) {
      tr.classList.add('clickable');
      tr.tabIndex = 0;
      tr.addEventListener('click', () => options.onclick(row));
      tr.addEventListener('keydown', (e) => { if (e.key === 'Enter') options.onclick(row); });
    }
    return tr;
  });
  return h('table', options.attrs || null,
    h('thead', null, h('tr', null, columns.map((c) => h('th', null, c.title)))),
    h('tbody', null, body));
}

/** A definition list of [label, value] pairs. */
export function kv(pairs) {
  return h('dl.kv', null, pairs.filter(([, v]) => v !== undefined && v !== null)
    .map(([k, v]) => [h('dt', null, k), h('dd', null, v)]));
}

/** Any JSON value, compactly: scalars as text, the rest as code. */
export function value(v) {
  if (v === null || v === undefined) return h('span.muted', null, '—');
  if (typeof v === 'object') return h('code', null, JSON.stringify(v));
  return String(v);
}

/** Columns for rows of unknown shape: the union of their scalar-ish keys, in first-seen order. */
export function genericColumns(rows, skip = []) {
  const keys = [];
  for (const row of rows) {
    for (const key of Object.keys(row || {})) if (!keys.includes(key) && !skip.includes(key)) keys.push(key);
  }
  return keys.map((key) => ({ title: key.replace(/_/g, ' '), cell: (row) => value(row ? row[key] : null) }));
}

/** Rows of a list answer that may be a bare array or {key: [...]}. */
export function listOf(answer, ...keys) {
  if (Array.isArray(answer)) return answer;
  for (const key of keys) if (answer && Array.isArray(answer[key])) return answer[key];
  return [];
}
