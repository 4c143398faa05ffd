// Event topics with their consumer groups' lag (GET /v1/events/topics).

import { get } from '../api.js';
import { badge, clear, errorNotice, genericColumns, h, listOf, table, unavailableNotice, value } from '../dom.js';
import { num } from '../format.js';

export async function render(ctx) {
  const { root, signal } = ctx;
  clear(root).append(h('h1', null, 'Event topics'));
  let answer;
  try {
    answer = await get('/v1/events/topics', { signal });
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    root.append(e.unavailable ? unavailableNotice('Event topics are', e) : errorNotice(e, 'Cannot list the topics'));
    return;
  }
  const topics = listOf(answer, 'topics');
  root.append(table([
    { title: 'Topic', cell: (t) => h('code', null, t.name ?? t.topic) },
    { title: 'Partitions', cell: (t) => value(t.partitions) },
    { title: 'End offset', cell: (t) => value(t.end_offset ?? t.high_watermark) },
    {
      title: 'Consumer groups (lag)',
      cell: (t) => {
        const groups = listOf(t.groups ?? t.consumer_groups);
        if (!groups.length) return h('span.muted', null, 'none');
        return groups.map((g) => [h('code', null, g.group ?? g.name), ' ', badge(num(Number(g.lag)), Number(g.lag) > 0 ? 'unknown' : 'ok'), ' ']);
      },
    },
  ], topics, { empty: 'No topic exists yet.', attrs: { id: 'topics-table' } }));
  const extra = topics.filter((t) => !t.groups && !t.consumer_groups);
  if (extra.length) root.append(h('h2', null, 'Details'), table(genericColumns(extra), extra));
}
