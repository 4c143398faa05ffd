// Services → instances → one instance (with its recent traces when the node keeps traces).

import { get, seg } from '../api.js';
import { badge, clear, emptyNotice, errorNotice, h, kv, listOf, table, unavailableNotice, value } from '../dom.js';
import { ago, dateTime, nanos } from '../format.js';
import { parse } from '../prom.js';
import { ns } from './traces.js';

export async function render(ctx) {
  const [service, id] = ctx.args;
  if (id !== undefined) return instance(ctx, service, id);
  if (service !== undefined) return instances(ctx, service);
  return list(ctx);
}

function crumbs(ctx, ...items) {
  return h('div.breadcrumbs', null,
    h('a', { href: '#/services' }, 'Services'),
    items.map(([text, href]) => [' / ', href ? h('a', { href }, text) : h('span', null, text)]));
}

function staleNotice(answer) {
  return answer && answer.stale
    ? h('div.notice.unavailable', { role: 'status' }, h('strong', null, 'Stale'), h('div', null, 'The store is unreachable; this is the last snapshot the registry loaded.'))
    : null;
}

/** Instances by service and status, from the node's trellis_registry_instances gauge. */
async function healthByService(signal) {
  try {
    const samples = parse(await get('/metrics', { text: true, signal }));
    const by = new Map();
    for (const s of samples) {
      if (s.name !== 'trellis_registry_instances') continue;
      const entry = by.get(s.labels.service) || {};
      entry[s.labels.status] = (entry[s.labels.status] || 0) + s.value;
      by.set(s.labels.service, entry);
    }
    return by;
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    return null;
  }
}

async function list(ctx) {
  const { root, signal, go } = ctx;
  let answer;
  let health;
  try {
    [answer, health] = await Promise.all([get('/v1/services', { signal }), healthByService(signal)]);
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    clear(root).append(h('h1', null, 'Services'), errorNotice(e, 'Cannot list services'));
    return;
  }
  const services = listOf(answer, 'services');
  const columns = [
    { title: 'Service', cell: (s) => h('a', { href: `#/services/${seg(s.name)}` }, s.name) },
    { title: 'Instances', cell: (s) => String(s.instances) },
    {
      title: 'Health',
      cell: (s) => {
        const by = health && health.get(s.name);
        if (!by) return h('span.muted', null, health ? '—' : 'unknown (metrics unavailable)');
        return Object.entries(by).sort().map(([status, n]) => [badge(`${n} ${status}`, status), ' ']);
      },
    },
  ];
  clear(root).append(
    h('h1', null, 'Services'),
    staleNotice(answer),
    h('p.muted', null, `${services.length} service${services.length === 1 ? '' : 's'} registered.`),
    table(columns, services, {
      empty: 'No service is registered. Register one with PUT /v1/services/{service}/instances/{id}.',
      onclick: (s) => go('services', s.name),
      rowAttrs: (s) => ({ 'data-service': s.name }),
      attrs: { id: 'services-table' },
    }),
  );
}

function metadata(meta) {
  const entries = Object.entries(meta || {});
  if (!entries.length) return h('span.muted', null, '—');
  return entries.map(([k, v]) => h('code', null, `${k}=${v} `));
}

async function instances(ctx, service) {
  const { root, signal, go } = ctx;
  let answer;
  try {
    answer = await get(`/v1/services/${seg(service)}/instances`, { signal });
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    clear(root).append(crumbs(ctx, [service]), h('h1', null, service), errorNotice(e, `Cannot list the instances of ${service}`));
    return;
  }
  const rows = listOf(answer, 'instances');
  const now = Date.now();
  const columns = [
    { title: 'Instance', cell: (r) => h('a', { href: `#/services/${seg(service)}/${seg(r.id)}` }, r.id) },
    { title: 'Address', cell: (r) => h('code', null, `${r.host}:${r.port}`) },
    { title: 'Status', cell: (r) => badge(r.status || 'unknown') },
    { title: 'Version', cell: (r) => r.version || h('span.muted', null, '—') },
    { title: 'Metadata', cell: (r) => metadata(r.metadata) },
    { title: 'Last update', cell: (r) => h('span', { title: dateTime(r.updated_at_ms) }, ago(r.updated_at_ms, now)) },
    { title: 'Lease until', cell: (r) => (r.expires_at_ms ? h('span', { title: dateTime(r.expires_at_ms) }, ago(r.expires_at_ms, now)) : '—') },
  ];
  clear(root).append(
    crumbs(ctx, [service]),
    h('h1', null, service),
    staleNotice(answer),
    table(columns, rows, {
      empty: `No live instance of ${service}: it may have deregistered or let its lease run out.`,
      onclick: (r) => go('services', service, r.id),
      rowAttrs: (r) => ({ 'data-instance': r.id }),
      attrs: { id: 'instances-table' },
    }),
    h('p', null, h('a', { href: `#/config/${seg(service)}` }, `Configuration of ${service} →`)),
  );
}

async function instance(ctx, service, id) {
  const { root, signal } = ctx;
  let r;
  try {
    r = await get(`/v1/services/${seg(service)}/instances/${seg(id)}`, { signal });
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    clear(root).append(crumbs(ctx, [service, `#/services/${seg(service)}`], [id]), h('h1', null, id), errorNotice(e, `Cannot load instance ${id} of ${service}`));
    return;
  }
  const now = Date.now();
  const check = r.health_check;
  const tracesSection = h('div', { id: 'instance-traces' }, h('p.muted', null, 'Loading traces…'));
  clear(root).append(
    crumbs(ctx, [service, `#/services/${seg(service)}`], [id]),
    h('h1', null, `${id} `, badge(r.status || 'unknown')),
    h('div.grid', null,
      h('div.card', { id: 'instance-detail' }, kv([
        ['Service', r.service],
        ['Address', h('code', null, `${r.host}:${r.port}`)],
        ['Status', badge(r.status || 'unknown')],
        ['Version', r.version || '—'],
        ['Registered', `${dateTime(r.registered_at_ms)} (${ago(r.registered_at_ms, now)})`],
        ['Last update', `${dateTime(r.updated_at_ms)} (${ago(r.updated_at_ms, now)})`],
        ['Lease until', r.expires_at_ms ? `${dateTime(r.expires_at_ms)} (${ago(r.expires_at_ms, now)})` : '—'],
        ['TTL', value(r.ttl)],
        ['Lease owner', r.owner || '—'],
        ['Health check', check ? h('code', null, JSON.stringify(check)) : 'none (TTL: heartbeats keep it healthy)'],
      ])),
      h('div.card', null, h('strong', null, 'Metadata'),
        Object.keys(r.metadata || {}).length
          ? table([{ title: 'Key', cell: ([k]) => k }, { title: 'Value', cell: ([, v]) => h('code', null, v) }], Object.entries(r.metadata))
          : emptyNotice('No metadata.')),
    ),
    h('h2', null, 'Recent traces'),
    tracesSection,
  );
  await recentTraces(ctx, service, tracesSection);
}

async function recentTraces(ctx, service, section) {
  const { signal, go } = ctx;
  let answer;
  try {
    answer = await get(`/v1/traces?service=${seg(service)}&limit=20`, { signal });
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    clear(section).append(e.unavailable ? unavailableNotice('Tracing is', e) : errorNotice(e, 'Cannot load traces'));
    return;
  }
  const traces = listOf(answer, 'traces');
  clear(section).append(table([
    { title: 'Trace', cell: (t) => h('a', { href: `#/traces/${seg(t.trace_id)}` }, h('code', null, String(t.trace_id).slice(0, 16))) },
    { title: 'Root', cell: (t) => `${t.root_service || '?'} ${t.root_name || ''}` },
    { title: 'Started', cell: (t) => { const at = ns(t, 'start_unix'); return Number.isFinite(at) ? dateTime(at / 1e6) : '—'; } },
    { title: 'Duration', cell: (t) => nanos(ns(t, 'duration')) },
    { title: 'Spans', cell: (t) => value(t.span_count) },
    { title: '', cell: (t) => (t.error ? badge('error') : '') },
  ], traces, {
    empty: `No recorded trace involves ${service}.`,
    onclick: (t) => go('traces', t.trace_id),
    rowAttrs: (t) => ({ 'data-trace': t.trace_id }),
    attrs: { id: 'instance-traces-table' },
  }));
}
