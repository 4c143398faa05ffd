// Recent traces and one trace as a waterfall (GET /v1/traces, /v1/traces/{trace_id}).

import { get, seg } from '../api.js';
import { badge, clear, emptyNotice, errorNotice, h, kv, listOf, table, unavailableNotice, value } from '../dom.js';
import { dateTime, nanos } from '../format.js';

/** A time field in nanoseconds, from `NAME_ns` or `NAME_us` (the buffer reports µs). */
export function ns(obj, name) {
  if (!obj) return NaN;
  if (obj[`${name}_ns`] !== undefined && obj[`${name}_ns`] !== null) return Number(obj[`${name}_ns`]);
  if (obj[`${name}_us`] !== undefined && obj[`${name}_us`] !== null) return Number(obj[`${name}_us`]) * 1e3;
  return NaN;
}

function started(t) {
  const unix = Number.isFinite(Number(t.start_unix_nanos)) ? Number(t.start_unix_nanos) : ns(t, 'start_unix');
  return Number.isFinite(unix) ? dateTime(unix / 1e6) : '—';
}

function statusText(status) {
  if (!status) return '—';
  if (typeof status === 'string') return status;
  return `${status.code || '?'}${status.message ? `: ${status.message}` : ''}`;
}

export async function render(ctx) {
  const [traceId] = ctx.args;
  return traceId === undefined ? list(ctx) : waterfall(ctx, traceId);
}

async function list(ctx) {
  const { root, signal, go, params } = ctx;
  const service = params.get('service') || '';
  const input = h('input', { id: 'traces-service', value: service, placeholder: 'any service' });
  const form = h('form.toolbar', null, h('label', null, 'Service', input), h('button', { type: 'submit' }, 'Filter'));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    go('traces', { service: input.value.trim() });
  });
  clear(root).append(h('h1', null, 'Traces'), form);
  let answer;
  try {
    answer = await get(`/v1/traces?limit=50${service ? `&service=${seg(service)}` : ''}`, { signal });
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    root.append(e.unavailable ? unavailableNotice('Tracing is', e) : errorNotice(e, 'Cannot list traces'));
    return;
  }
  const traces = listOf(answer, 'traces');
  root.append(table([
    { title: 'Trace', cell: (t) => h('a', { href: `#/traces/${seg(t.trace_id)}` }, h('code', null, String(t.trace_id).slice(0, 16))) },
    { title: 'Root service', cell: (t) => value(t.root_service) },
    { title: 'Operation', cell: (t) => value(t.root_name) },
    { title: 'Started', cell: started },
    { title: 'Duration', cell: (t) => nanos(ns(t, 'duration')) },
    { title: 'Spans', cell: (t) => value(t.span_count) },
    { title: 'Status', cell: (t) => badge(t.error ? 'error' : 'ok') },
  ], traces, {
    empty: service ? `No recorded trace involves ${service}.` : 'No trace recorded yet.',
    onclick: (t) => go('traces', t.trace_id),
    rowAttrs: (t) => ({ 'data-trace': t.trace_id }),
    attrs: { id: 'traces-table' },
  }));
}

/** Spans in tree order (parents before children, siblings by start), with their depth. */
export function treeOrder(spans) {
  const ids = new Set(spans.map((s) => s.span_id));
  const children = new Map();
  const roots = [];
  for (const s of spans) {
    const parent = s.parent_span_id;
    if (parent && ids.has(parent) && parent !== s.span_id) {
      if (!children.has(parent)) children.set(parent, []);
      children.get(parent).push(s);
    } else {
      roots.push(s);
    }
  }
  const byStart = (a, b) => a.offset - b.offset;
  const out = [];
  const seen = new Set();
  const walk = (s, depth) => {
    if (seen.has(s.span_id)) return;
    seen.add(s.span_id);
    out.push({ span: s, depth });
    for (const c of (children.get(s.span_id) || []).sort(byStart)) walk(c, depth + 1);
  };
  for (const r of roots.sort(byStart)) walk(r, 0);
  return out;
}

function isError(span) {
  const status = span.status;
  if (!status) return false;
  if (typeof status === 'string') return /error/i.test(status);
  return /error/i.test(String(status.code || status.status || ''));
}

async function waterfall(ctx, traceId) {
  const { root, signal } = ctx;
  const crumbs = h('div.breadcrumbs', null, h('a', { href: '#/traces' }, 'Traces'), ' / ', h('code', null, traceId));
  let trace;
  try {
    trace = await get(`/v1/traces/${seg(traceId)}`, { signal });
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    clear(root).append(crumbs, h('h1', null, 'Trace'),
      e.unavailable ? unavailableNotice('Tracing is', e) : errorNotice(e, `Cannot load trace ${traceId}`));
    return;
  }
  const raw = listOf(trace, 'spans');
  if (!raw.length) {
    clear(root).append(crumbs, h('h1', null, 'Trace'), emptyNotice('This trace has no spans.'));
    return;
  }
  // Offsets from the trace start: given, or derived from absolute start times.
  const absolute = raw.map((s) => (Number.isFinite(Number(s.start_unix_nanos)) ? Number(s.start_unix_nanos) : ns(s, 'start_unix')));
  const t0 = Math.min(...absolute.filter(Number.isFinite));
  const spans = raw.map((s, i) => {
    const offset = ns(s, 'start_offset');
    return {
      ...s,
      offset: Number.isFinite(offset) ? offset : (Number.isFinite(absolute[i]) ? absolute[i] - t0 : 0),
      length: Math.max(0, ns(s, 'duration') || 0),
    };
  });
  const total = Math.max(1, ...spans.map((s) => s.offset + s.length));
  const detail = h('div.card', { id: 'span-detail' }, h('span.muted', null, 'Click a span for its attributes and events.'));
  const showSpan = (s) => {
    clear(detail).append(
      h('strong', null, `${s.service || '?'} · ${s.name || '?'}`),
      kv([
        ['Span', h('code', null, s.span_id)],
        ['Parent', s.parent_span_id ? [h('code', null, s.parent_span_id), s.parent_in_trace === false ? ' (in another process, not held here)' : ''] : 'root'],
        ['Start', `+${nanos(s.offset)}`],
        ['Duration', nanos(s.length)],
        ['Kind', value(s.kind)],
        ['Status', statusText(s.status)],
      ]),
      h('h2', null, 'Attributes'),
      table([{ title: 'Key', cell: ([k]) => k }, { title: 'Value', cell: ([, v]) => value(v) }], Object.entries(s.attributes || {}), { empty: 'No attributes.' }),
      h('h2', null, 'Events'),
      table([
        { title: 'Name', cell: (e) => value(e.name) },
        { title: 'At', cell: (e) => (Number.isFinite(ns(e, 'offset')) ? `+${nanos(ns(e, 'offset'))}` : value(e.time_unix_nanos)) },
        { title: 'Attributes', cell: (e) => value(e.attributes) },
      ], listOf(s.events), { empty: 'No events.' }),
    );
  };
  const rows = treeOrder(spans).map(({ span, depth }) => {
    const bar = h('div.bar', { class: isError(span) ? 'error' : null, title: `${span.name} ${nanos(span.length)}` });
    bar.style.left = `${(span.offset / total) * 100}%`;
    bar.style.width = `${(span.length / total) * 100}%`;
    const label = h('div.label', { title: `${span.service} ${span.name}` }, `${'\u00a0\u00a0'.repeat(depth)}${span.service || '?'} `, h('span.muted', null, span.name || ''));
    const row = h('div.row', { 'data-span': span.span_id, tabindex: 0 }, label, h('div.track', null, bar), h('div.dur', null, nanos(span.length)));
    row.addEventListener('click', () => showSpan(span));
    return row;
  });
  const services = new Set(spans.map((s) => s.service));
  const errors = spans.filter(isError).length;
  clear(root).append(
    crumbs,
    h('h1', null, 'Trace ', h('code', null, traceId.slice(0, 16)), ' ', badge(errors ? 'error' : 'ok')),
    h('p.muted', null, `${spans.length} spans · ${services.size} services · ${nanos(total)}${errors ? ` · ${errors} failed` : ''}`),
    h('div.card.waterfall', { id: 'waterfall' }, rows),
    detail,
  );
}
