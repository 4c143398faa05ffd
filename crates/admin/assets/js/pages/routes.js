// Gateway routes with their upstreams, circuit breakers and rate limits.

import { get } from '../api.js';
import { badge, clear, errorNotice, h, listOf, table, unavailableNotice, value } from '../dom.js';
import { millis, num } from '../format.js';

const REFRESH_MS = 5000;

export async function render(ctx) {
  const { root, signal } = ctx;
  const body = h('div');
  const refresh = h('button.secondary', { type: 'button' }, 'Refresh');
  clear(root).append(
    h('div.toolbar', null, h('h1', null, 'Gateway routes'), refresh),
    body,
  );
  const load = async () => {
    const [routes, upstreams, limits] = await Promise.allSettled(
      ['routes', 'upstreams', 'ratelimits'].map((v) => get(`/v1/gateway/${v}`, { signal })),
    );
    if (signal.aborted) return;
    clear(body);
    if (routes.status === 'rejected') {
      const e = routes.reason;
      body.append(e && e.status === 404 ? unavailableNotice('The gateway is', e) : errorNotice(e, 'Cannot load the routes'));
      return;
    }
    body.append(routeTable(listOf(routes.value, 'routes')));
    body.append(h('h2', null, 'Upstreams and circuit breakers'));
    body.append(upstreams.status === 'fulfilled' ? upstreamCards(listOf(upstreams.value, 'routes')) : errorNotice(upstreams.reason, 'Cannot load the upstreams'));
    body.append(h('h2', null, 'Rate limits'));
    body.append(limits.status === 'fulfilled' ? limitTable(listOf(limits.value, 'classes')) : errorNotice(limits.reason, 'Cannot load the rate limits'));
  };
  refresh.addEventListener('click', () => load().catch(() => {}));
  await load();
  const timer = setInterval(() => load().catch(() => {}), REFRESH_MS);
  return () => clearInterval(timer);
}

function routeTable(routes) {
  return table([
    { title: 'Path', cell: (r) => h('code', null, r.path) },
    { title: 'Service', cell: (r) => h('a', { href: `#/services/${encodeURIComponent(r.service)}` }, r.service) },
    { title: 'Methods', cell: (r) => (r.methods && r.methods.length ? r.methods.join(' ') : 'any') },
    { title: 'Host', cell: (r) => value(r.host) },
    { title: 'Strip prefix', cell: (r) => value(r.strip_prefix) },
    { title: 'Timeout', cell: (r) => value(r.timeout) },
    { title: 'Retries', cell: (r) => value(r.retries) },
    { title: 'Balancer', cell: (r) => value(r.load_balancer) },
    { title: 'Auth', cell: (r) => [r.authentication ? badge('authn', 'ok') : null, ' ', r.authorization ? badge('authz', 'ok') : null] },
    { title: 'Rate class', cell: (r) => value(r.rate_limit_class) },
  ], routes, { empty: 'The gateway has no routes configured.', attrs: { id: 'routes-table' } });
}

function breaker(cb) {
  if (!cb) return h('p.muted', null, 'No circuit breaker on this route.');
  return h('p', { 'data-breaker': cb.state }, 'Circuit breaker ', badge(cb.state), ' ',
    h('span.muted', null, `${cb.consecutive_failures} failures in a row · ${cb.window_failures}/${cb.window_requests} failed in window · opened ${cb.times_opened}× · ${cb.rejected} rejected`),
    cb.retry_in !== null && cb.retry_in !== undefined ? ` · probe in ${millis(cb.retry_in)}` : '');
}

function upstreamCards(routes) {
  if (!routes.length) return h('p.muted', null, 'No upstreams.');
  return h('div.grid', null, routes.map((r) => h('div.card', null,
    h('strong', null, h('code', null, r.path), ' → ', r.service),
    breaker(r.circuit_breaker),
    table([
      { title: 'Instance', cell: (e) => h('code', { 'data-endpoint': e.id }, e.id) },
      { title: 'Health', cell: (e) => badge(e.healthy ? 'healthy' : 'unhealthy') },
      { title: 'Eligible', cell: (e) => (e.eligible ? 'yes' : badge('ejected', 'open')) },
      { title: 'Weight', cell: (e) => value(e.weight) },
      { title: 'In flight', cell: (e) => value(e.in_flight) },
      { title: 'Requests', cell: (e) => num(e.requests) },
      { title: 'Failures', cell: (e) => num(e.failures) },
      { title: 'Ejected for', cell: (e) => (e.ejected_for ? millis(e.ejected_for) : '—') },
    ], listOf(r.instances), {
      empty: `The balancer holds no instance of ${r.service} yet: it is filled from the registry on the route's first request.`,
      attrs: { 'data-upstreams': r.path },
    }),
  )));
}

function limitTable(classes) {
  return table([
    { title: 'Class', cell: (c) => c.class || h('span.muted', null, 'default') },
    { title: 'Quota', cell: (c) => (c.quota ? `${c.quota.requests} per ${millis(c.quota.window)} (burst ${c.quota.burst})` : '—') },
    { title: 'Keys tracked', cell: (c) => num(c.keys) },
    { title: 'Admitted', cell: (c) => num(c.admitted) },
    { title: 'Limited', cell: (c) => (c.limited ? badge(num(c.limited), 'error') : '0') },
    { title: 'Evicted', cell: (c) => num(c.evicted) },
  ], classes, { empty: 'Rate limiting is off on this gateway.', attrs: { id: 'ratelimits-table' } });
}
