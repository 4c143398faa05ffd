// Sagas and their step histories (GET /v1/sagas?state=…, /v1/sagas/{id}).

import { get, seg } from '../api.js';
import { badge, clear, emptyNotice, errorNotice, genericColumns, h, kv, listOf, table, unavailableNotice, value } from '../dom.js';
import { ago, dateTime, millis } from '../format.js';

const STATES = ['', 'running', 'compensating', 'completed', 'compensated', 'needs_attention', 'aborted'];

const id = (s) => s.id ?? s.saga_id ?? s.instance_id;
const name = (s) => s.name ?? s.saga ?? s.definition ?? s.type;
const time = (ms) => (ms ? h('span', { title: dateTime(ms) }, ago(ms)) : '—');

export async function render(ctx) {
  const [sagaId] = ctx.args;
  return sagaId === undefined ? list(ctx) : detail(ctx, sagaId);
}

async function list(ctx) {
  const { root, signal, go, params } = ctx;
  const state = params.get('state') || '';
  const select = h('select', { id: 'saga-state' }, STATES.map((s) => h('option', { value: s, selected: s === state }, s || 'any state')));
  select.addEventListener('change', () => go('sagas', { state: select.value }));
  clear(root).append(h('h1', null, 'Sagas'), h('div.toolbar', null, h('label', null, 'State', select)));
  let answer;
  try {
    answer = await get(`/v1/sagas${state ? `?state=${seg(state)}` : ''}`, { signal });
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    root.append(e.unavailable ? unavailableNotice('Sagas are', e) : errorNotice(e, 'Cannot list sagas'));
    return;
  }
  const sagas = listOf(answer, 'sagas', 'instances');
  root.append(table([
    { title: 'Saga', cell: (s) => h('a', { href: `#/sagas/${seg(id(s))}` }, h('code', null, String(id(s)))) },
    { title: 'Name', cell: (s) => value(name(s)) },
    { title: 'State', cell: (s) => badge(s.state || s.status || 'unknown') },
    { title: 'Step', cell: (s) => value(s.current_step ?? s.step) },
    { title: 'Started', cell: (s) => time(s.started_at_ms ?? s.created_at_ms) },
    { title: 'Updated', cell: (s) => time(s.updated_at_ms) },
    { title: 'Error', cell: (s) => (s.error ? h('span.error', null, s.error) : '') },
  ], sagas, {
    empty: state ? `No saga is ${state}.` : 'No saga has run yet.',
    onclick: (s) => go('sagas', String(id(s))),
    rowAttrs: (s) => ({ 'data-saga': id(s) }),
    attrs: { id: 'sagas-table' },
  }));
}

async function detail(ctx, sagaId) {
  const { root, signal } = ctx;
  const crumbs = h('div.breadcrumbs', null, h('a', { href: '#/sagas' }, 'Sagas'), ' / ', h('code', null, sagaId));
  let saga;
  try {
    saga = await get(`/v1/sagas/${seg(sagaId)}`, { signal });
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    clear(root).append(crumbs, h('h1', null, 'Saga'), e.unavailable ? unavailableNotice('Sagas are', e) : errorNotice(e, `Cannot load saga ${sagaId}`));
    return;
  }
  const s = saga.saga && typeof saga.saga === 'object' ? { ...saga.saga, ...saga } : saga;
  const scalars = Object.entries(s).filter(([, v]) => v === null || typeof v !== 'object');
  const lists = Object.entries(s).filter(([k, v]) => Array.isArray(v) && k !== 'steps' && k !== 'history');
  const objects = Object.entries(s).filter(([k, v]) => v && typeof v === 'object' && !Array.isArray(v) && k !== 'saga');
  clear(root).append(
    crumbs,
    h('h1', null, `${name(s) || 'Saga'} `, badge(s.state || s.status || 'unknown')),
    h('div.card', { id: 'saga-detail' }, kv(scalars.map(([k, v]) => [k.replace(/_/g, ' '), /_ms$/.test(k) ? dateTime(v) : value(v)]).concat(objects.map(([k, v]) => [k.replace(/_/g, ' '), value(v)])))),
    h('h2', null, 'Steps'),
    table([
      { title: '#', cell: (_, i) => String(i + 1) },
      { title: 'Step', cell: (st) => value(st.name) },
      { title: 'Status', cell: (st) => badge(st.status || 'unknown') },
      { title: 'Attempts', cell: (st) => value(st.attempts) },
      { title: 'Started', cell: (st) => (st.started_at_ms ? dateTime(st.started_at_ms) : '—') },
      { title: 'Took', cell: (st) => millis(st.duration_ms) },
      { title: 'Error', cell: (st) => (st.error ? h('span.error', null, st.error) : '') },
      { title: 'Compensation', cell: (st) => (st.compensation_attempts ? `${st.compensation_attempts} attempt(s), ${millis(st.compensation_duration_ms)}${st.compensation_error ? ` — ${st.compensation_error}` : ''}` : '—') },
    ], listOf(s.steps), { empty: 'This saga has no steps.', attrs: { id: 'saga-steps' } }),
    h('h2', null, 'History'),
    table([
      { title: 'At', cell: (e) => (e.at_ms ? dateTime(e.at_ms) : '—') },
      { title: 'Event', cell: (e) => value(e.event) },
      { title: 'Step', cell: (e) => value(e.step) },
      { title: 'Node', cell: (e) => value(e.node) },
      { title: 'Error', cell: (e) => (e.error ? h('span.error', null, e.error) : '') },
    ], listOf(s.history), { empty: 'No history recorded.', attrs: { id: 'saga-history' } }),
    lists.map(([k, rows]) => [
      h('h2', null, k.replace(/_/g, ' ')),
      rows.length && typeof rows[0] === 'object'
        ? table(genericColumns(rows), rows, { attrs: { 'data-list': k } })
        : (rows.length ? h('code', null, JSON.stringify(rows)) : emptyNotice(`No ${k}.`)),
    ]),
  );
}
