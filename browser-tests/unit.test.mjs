// The dashboard's pure modules (Prometheus parsing and rates, JSON diff), run in Node on
// the very files the binary embeds.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { diffJson } from '../crates/admin/assets/js/diff.js';
import { ns, treeOrder } from '../crates/admin/assets/js/pages/traces.js';
import { bucketDelta, buckets, parse, quantile, rates, summarise } from '../crates/admin/assets/js/prom.js';

const SCRAPE = `# HELP trellis_gateway_requests Gateway requests.
# TYPE trellis_gateway_requests counter
trellis_gateway_requests_total{route="/api/users/*",service="user-service",status="200"} 90
trellis_gateway_requests_total{route="/api/users/*",service="user-service",status="503"} 10
trellis_gateway_request_duration_seconds_bucket{route="/api/users/*",le="0.01"} 50
trellis_gateway_request_duration_seconds_bucket{route="/api/users/*",le="0.1"} 90
trellis_gateway_request_duration_seconds_bucket{route="/api/users/*",le="+Inf"} 100
trellis_admin_requests_total{route="/metrics",method="GET",status="200"} 7
trellis_admin_requests_total{route="/v1/services",method="GET",status="200"} 3
trellis_admin_request_duration_seconds_bucket{route="/v1/services",le="+Inf"} 3
odd_label{v="a \\"quoted\\" }value"} 1
not a sample line
# EOF
`;

test('parses samples, labels with escapes, and +Inf', () => {
  const samples = parse(SCRAPE);
  assert.equal(samples.length, 9);
  assert.deepEqual(samples[0].labels, { route: '/api/users/*', service: 'user-service', status: '200' });
  assert.equal(samples.find((s) => s.name === 'odd_label').labels.v, 'a "quoted" }value');
  assert.deepEqual(buckets(samples, 'trellis_gateway_request_duration_seconds'), [[0.01, 50], [0.1, 90], [Infinity, 100]]);
});

test('quantiles interpolate inside the bucket like histogram_quantile', () => {
  const b = [[0.01, 50], [0.1, 90], [Infinity, 100]];
  assert.equal(quantile(0.5, b), 0.01);
  assert.ok(Math.abs(quantile(0.7, b) - 0.055) < 1e-12);
  assert.equal(quantile(0.99, b), 0.1, 'the +Inf bucket answers its lower bound');
  assert.ok(Number.isNaN(quantile(0.5, [[1, 0], [Infinity, 0]])));
  assert.equal(bucketDelta([[1, 5]], [[1, 7]]), null, 'a counter reset is no rate');
});

test('rates between two scrapes leave the /metrics polls out of the admin figures', () => {
  const before = summarise(parse(SCRAPE), 0);
  const later = SCRAPE
    .replace('status="200"} 90', 'status="200"} 170')
    .replace('status="503"} 10', 'status="503"} 30')
    .replace('le="0.01"} 50', 'le="0.01"} 150')
    .replace('le="0.1"} 90', 'le="0.1"} 190')
    .replace('le="+Inf"} 100', 'le="+Inf"} 200')
    .replace('route="/metrics",method="GET",status="200"} 7', 'route="/metrics",method="GET",status="200"} 900');
  const after = summarise(parse(later), 2000);
  const gw = rates(after, before, 'gateway');
  assert.equal(gw.rps, 50);
  assert.equal(gw.eps, 10);
  assert.equal(gw.errorRatio, 0.2);
  assert.equal(gw.p50, 0.01 * (50 / 100));
  const admin = rates(after, before, 'admin');
  assert.equal(admin.rps, 0, 'the dashboard polling /metrics is not traffic');
  assert.equal(rates(before, after, 'gateway'), null, 'going backwards (a restart) is no rate');
});

test('JSON diff is by line over sorted keys', () => {
  const lines = diffJson({ b: 1, a: { pool: 10 } }, { a: { pool: 20 }, b: 1 });
  assert.deepEqual(lines.filter((l) => l.op !== 'same').map((l) => `${l.op} ${l.text.trim()}`), ['del "pool": 10', 'add "pool": 20']);
  assert.ok(diffJson({ x: 1 }, { x: 1 }).every((l) => l.op === 'same'));
});

test('waterfall order: parents before children, siblings by start, orphans as roots', () => {
  const span = (span_id, parent_span_id, offset) => ({ span_id, parent_span_id, offset });
  const order = treeOrder([
    span('c2', 'root', 50),
    span('root', null, 0),
    span('c1', 'root', 10),
    span('g1', 'c2', 60),
    span('orphan', 'missing', 5),
    span('self', 'self', 70),
  ]);
  assert.deepEqual(order.map((o) => `${o.span.span_id}@${o.depth}`), ['root@0', 'c1@1', 'c2@1', 'g1@2', 'orphan@0', 'self@0']);
});

test('trace times are read in ns or in µs (what the trace buffer reports)', () => {
  assert.equal(ns({ duration_us: 1500 }, 'duration'), 1_500_000);
  assert.equal(ns({ duration_ns: 42, duration_us: 1 }, 'duration'), 42);
  assert.ok(Number.isNaN(ns({}, 'duration')));
});
