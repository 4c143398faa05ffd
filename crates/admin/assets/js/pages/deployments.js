// Deployments with their traffic split and decisions (GET /v1/deployments).

import { get } from '../api.js';
import { badge, clear, errorNotice, genericColumns, h, listOf, table, unavailableNotice, value } from '../dom.js';
import { ago, dateTime } from '../format.js';

function split(traffic) {
  const parts = Array.isArray(traffic)
    ? traffic.map((t) => [t.version ?? t.name ?? t.track, Number(t.weight ?? t.percent ?? t.share)])
    : Object.entries(traffic || {}).map(([k, v]) => [k, Number(v)]);
  const total = parts.reduce((n, [, w]) => n + (Number.isFinite(w) ? w : 0), 0);
  if (!parts.length || !(total > 0)) return h('span.muted', null, '—');
  const bar = h('div.split', { title: parts.map(([k, w]) => `${k}: ${w}`).join(', ') },
    parts.map(([k, w]) => {
      const span = h('span', null, `${k} ${Math.round((w / total) * 100)}%`);
      span.style.width = `${(w / total) * 100}%`;
      return span;
    }));
  return bar;
}

export async function render(ctx) {
  const { root, signal } = ctx;
  clear(root).append(h('h1', null, 'Deployments'));
  let answer;
  try {
    answer = await get('/v1/deployments', { signal });
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    root.append(e.unavailable ? unavailableNotice('Deployments are', e) : errorNotice(e, 'Cannot list the deployments'));
    return;
  }
  const deployments = listOf(answer, 'deployments');
  root.append(table([
    { title: 'Service', cell: (d) => value(d.service ?? d.name) },
    { title: 'Strategy', cell: (d) => value(d.strategy) },
    { title: 'State', cell: (d) => badge(d.state ?? d.status ?? 'unknown') },
    { title: 'Traffic', cell: (d) => split(d.traffic ?? d.split ?? d.weights) },
    { title: 'Updated', cell: (d) => (d.updated_at_ms ? h('span', { title: dateTime(d.updated_at_ms) }, ago(d.updated_at_ms)) : '—') },
  ], deployments, { empty: 'No deployment is in progress or recorded.', attrs: { id: 'deployments-table' } }));
  for (const d of deployments) {
    const decisions = listOf(d.decisions ?? d.history);
    if (!decisions.length) continue;
    root.append(h('h2', null, `Decisions: ${d.service ?? d.name}`), table(genericColumns(decisions), decisions));
  }
}
