// Request rate, error rate and latency of the gateway and the admin API, from /metrics
// scraped every few seconds while this page is open (the history survives page changes).

import { get } from '../api.js';
import { lineChart } from '../charts.js';
import { clear, errorNotice, h, kv } from '../dom.js';
import { num, percent, seconds } from '../format.js';
import { parse, rates, summarise } from '../prom.js';

const POLL_MS = 2000;
const WINDOW_MS = 5 * 60 * 1000;
const MAX_POINTS = Math.ceil(WINDOW_MS / POLL_MS) + 10;

/** Bounded history: [{at, gateway: rates|null, admin: rates|null}]. */
const history = [];
let last = null;

async function scrape(signal) {
  const at = Date.now();
  const summary = summarise(parse(await get('/metrics', { text: true, signal })), at);
  if (last) {
    history.push({ at, gateway: rates(summary, last, 'gateway'), admin: rates(summary, last, 'admin'), gatewayPresent: summary.gateway.present });
    while (history.length > MAX_POINTS) history.shift();
  }
  last = summary;
}

function series(family, key, name, scale = 1) {
  return { name, points: history.map((p) => [p.at, p[family] ? p[family][key] * scale : NaN]) };
}

function family(title, key, id) {
  const latest = [...history].reverse().find((p) => p[key]);
  const now = Date.now();
  const r = latest ? latest[key] : null;
  return h('div', { id },
    h('h2', null, title),
    h('div.card', null, kv([
      ['Requests', r ? `${num(r.rps)}/s` : '—'],
      ['Server errors (5xx)', r ? `${num(r.eps)}/s · ${percent(r.errorRatio)}` : '—'],
      ['Latency p50 / p99', r ? `${seconds(r.p50)} / ${seconds(r.p99)}` : '—'],
    ])),
    h('div.grid', null,
      lineChart({ title: 'Request rate (req/s)', series: [series(key, 'rps', 'requests/s')], windowMs: WINDOW_MS, now, format: (v) => num(v) }),
      lineChart({ title: 'Error rate (5xx/s)', series: [series(key, 'eps', '5xx/s')], windowMs: WINDOW_MS, now, format: (v) => num(v) }),
      lineChart({ title: 'Latency', series: [series(key, 'p50', 'p50', 1000), series(key, 'p99', 'p99', 1000)], windowMs: WINDOW_MS, now, format: (v) => `${num(v)} ms` }),
    ));
}

export async function render(ctx) {
  const { root, signal } = ctx;
  const body = h('div');
  clear(root).append(h('h1', null, 'Metrics'),
    h('p.muted', null, `Scraped from /metrics every ${POLL_MS / 1000}s while this page is open; rates are between consecutive scrapes; the last ${WINDOW_MS / 60000} minutes are kept.`),
    body);
  let failure = null;
  const draw = () => {
    clear(body);
    if (failure) body.append(errorNotice(failure, 'Cannot scrape /metrics'));
    const gatewayPresent = last ? last.gateway.present : false;
    body.append(gatewayPresent
      ? family('Gateway', 'gateway', 'metrics-gateway')
      : h('div.notice.empty', { id: 'metrics-gateway' }, h('strong', null, 'No gateway metrics'), h('div', null, 'No gateway runs in this node (no trellis_gateway_* families).')));
    body.append(family('Admin API (without /metrics polls)', 'admin', 'metrics-admin'));
  };
  const tick = async () => {
    try {
      await scrape(signal);
      failure = null;
    } catch (e) {
      if (e && e.name === 'AbortError') return;
      failure = e;
    }
    if (!signal.aborted) draw();
  };
  await tick();
  const timer = setInterval(tick, POLL_MS);
  return () => clearInterval(timer);
}
