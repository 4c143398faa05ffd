// Configuration versions of a service: history, a diff between two versions, rollback.

import { get, post, seg } from '../api.js';
import { badge, clear, emptyNotice, errorNotice, h, table } from '../dom.js';
import { diffJson } from '../diff.js';
import { ago, dateTime } from '../format.js';

export async function render(ctx) {
  const [service] = ctx.args;
  const env = ctx.params.get('env') || '';
  const { root, signal, go } = ctx;
  const serviceInput = h('input', { id: 'config-service', list: 'config-services', value: service || '', placeholder: 'user-service', required: true });
  const envInput = h('input', { id: 'config-env', value: env, placeholder: "the node's default" });
  const names = h('datalist', { id: 'config-services' });
  const form = h('form.toolbar', { id: 'config-form' },
    h('label', null, 'Service', serviceInput),
    h('label', null, 'Environment', envInput),
    h('button', { type: 'submit' }, 'Show versions'),
    names);
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    if (serviceInput.value.trim()) go('config', serviceInput.value.trim(), { env: envInput.value.trim() });
  });
  const body = h('div', { id: 'config-body' });
  clear(root).append(h('h1', null, service ? `Configuration of ${service}` : 'Configuration'), form, body);
  // Suggestions only: a failure here must not hide the page.
  get('/v1/services', { signal })
    .then((a) => names.append(...(a.services || []).map((s) => h('option', { value: s.name }))))
    .catch(() => {});
  if (!service) {
    body.append(emptyNotice('Pick a service to see its configuration versions.'));
    return;
  }
  await history(ctx, service, env, body, ctx.params.get('done'));
}

async function history(ctx, service, env, body, done) {
  const { signal, go } = ctx;
  const q = env ? `?env=${seg(env)}` : '';
  let answer;
  try {
    answer = await get(`/v1/config/${seg(service)}/history${q}`, { signal });
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    clear(body).append(e.status === 404 && !e.unavailable
      ? emptyNotice(`No configuration stored for ${service}${env ? ` in ${env}` : ''}.`, e.detail)
      : errorNotice(e, `Cannot load the configuration history of ${service}`));
    return;
  }
  const versions = [...(answer.versions || [])].sort((a, b) => a.version - b.version);
  const environment = answer.environment || env;
  clear(body);
  if (done) body.append(h('div.notice.ok', { role: 'status', id: 'config-done' }, h('strong', null, done)));
  if (!versions.length) {
    body.append(emptyNotice(`No configuration stored for ${service} in ${environment}.`,
      `Store one with PUT /v1/config/${service}?env=${environment}.`));
    return;
  }
  const current = versions[versions.length - 1];
  const byVersion = new Map(versions.map((v) => [v.version, v]));
  const pick = (name, fallback) => {
    const n = Number(ctx.params.get(name));
    return byVersion.has(n) ? n : fallback;
  };
  const a = pick('a', versions.length > 1 ? versions[versions.length - 2].version : current.version);
  const b = pick('b', current.version);
  const options = (selected) => versions.map((v) => h('option', { value: v.version, selected: v.version === selected }, `v${v.version}`));
  const selA = h('select', { id: 'diff-a' }, options(a));
  const selB = h('select', { id: 'diff-b' }, options(b));
  const diffBox = h('div', { id: 'config-diff' });
  const showDiff = () => {
    const va = byVersion.get(Number(selA.value));
    const vb = byVersion.get(Number(selB.value));
    const lines = diffJson(va.config, vb.config);
    clear(diffBox);
    if (!lines) {
      diffBox.append(emptyNotice('These documents are too large to diff here.'));
      return;
    }
    const changed = lines.filter((l) => l.op !== 'same').length;
    diffBox.append(
      h('p.muted', null, changed ? `${changed} line${changed === 1 ? '' : 's'} differ between v${va.version} and v${vb.version}.` : `v${va.version} and v${vb.version} hold the same document.`),
      h('pre.diff', null, lines.map((l) => h('span', { class: l.op }, `${l.op === 'add' ? '+ ' : l.op === 'del' ? '- ' : '  '}${l.text}`))),
    );
  };
  selA.addEventListener('change', showDiff);
  selB.addEventListener('change', showDiff);

  const rollbackCell = (v) => {
    if (v.version === current.version) return badge('current', 'ok');
    const cell = h('span');
    const start = h('button.secondary', { type: 'button', 'data-rollback': v.version }, `Roll back to v${v.version}`);
    start.addEventListener('click', () => {
      const confirm = h('button.danger', { type: 'button', 'data-confirm-rollback': v.version }, `Confirm: restore v${v.version} as v${current.version + 1}`);
      const cancel = h('button.secondary', { type: 'button' }, 'Cancel');
      const error = h('div');
      cancel.addEventListener('click', () => clear(cell).append(start));
      confirm.addEventListener('click', async () => {
        confirm.disabled = true;
        cancel.disabled = true;
        try {
          const q = `version=${v.version}${env ? `&env=${seg(env)}` : ''}`;
          const restored = await post(`/v1/config/${seg(service)}/rollback?${q}`, undefined, { signal });
          go('config', service, { env, done: `Rolled back: v${restored.version} now holds the document of v${v.version}.` });
        } catch (e) {
          if (e && e.name === 'AbortError') return;
          confirm.disabled = false;
          cancel.disabled = false;
          clear(error).append(errorNotice(e, 'Rollback failed; nothing changed'));
        }
      });
      clear(cell).append(confirm, ' ', cancel, error);
    });
    cell.append(start);
    return cell;
  };

  const now = Date.now();
  body.append(
    h('p.muted', null, `Environment ${environment} · ${versions.length} version${versions.length === 1 ? '' : 's'} · current v${current.version}`),
    table([
      { title: 'Version', cell: (v) => `v${v.version}` },
      { title: 'Written', cell: (v) => h('span', { title: dateTime(v.created_at_ms) }, ago(v.created_at_ms, now)) },
      { title: 'Origin', cell: (v) => (v.rolled_back_from ? `rollback to v${v.rolled_back_from}` : 'written') },
      { title: 'Keys', cell: (v) => h('code', null, Object.keys(v.config || {}).join(', ') || '—') },
      { title: '', cell: rollbackCell },
    ], [...versions].reverse(), { rowAttrs: (v) => ({ 'data-version': v.version }), attrs: { id: 'versions-table' } }),
    h('h2', null, 'Diff'),
    h('div.toolbar', null, h('label', null, 'From', selA), h('label', null, 'To', selB)),
    diffBox,
  );
  showDiff();
}
