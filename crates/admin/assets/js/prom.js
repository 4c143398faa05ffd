// Prometheus text format → samples, and rates between two scrapes.

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"/g;

function number(text) {
  if (text === '+Inf' || text === 'Inf') return Infinity;
  if (text === '-Inf') return -Infinity;
  return Number(text);
}

function unescape(text) {
  return text.replace(/\\(.)/g, (_, c) => (c === 'n' ? '\n' : c));
}

/** Parses the text exposition format into [{name, labels, value}]; skips what it cannot read. */
export function parse(text) {
  const samples = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const m = LINE.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[2]) for (const l of m[2].matchAll(LABEL)) labels[l[1]] = unescape(l[2]);
    const value = number(m[3]);
    if (!Number.isNaN(value)) samples.push({ name: m[1], labels, value });
  }
  return samples;
}

/** Sum of the samples of `name` whose labels pass `keep`. */
export function sum(samples, name, keep = () => true) {
  let total = 0;
  for (const s of samples) if (s.name === name && keep(s.labels)) total += s.value;
  return total;
}

/** Cumulative buckets of histogram `name` (summed over other labels): [[le, count]] by le. */
export function buckets(samples, name, keep = () => true) {
  const byLe = new Map();
  for (const s of samples) {
    if (s.name !== `${name}_bucket` || !keep(s.labels)) continue;
    const le = number(s.labels.le);
    byLe.set(le, (byLe.get(le) || 0) + s.value);
  }
  return [...byLe.entries()].sort((a, b) => a[0] - b[0]);
}

/** Bucket counts of `now` minus `before` (same bounds); null when a counter went down (restart). */
export function bucketDelta(now, before) {
  const old = new Map(before);
  const out = [];
  for (const [le, count] of now) {
    const d = count - (old.get(le) || 0);
    if (d < 0) return null;
    out.push([le, d]);
  }
  return out;
}

/** Like Prometheus' histogram_quantile: linear interpolation inside the bucket. */
export function quantile(q, cumulative) {
  if (!cumulative.length) return NaN;
  const total = cumulative[cumulative.length - 1][1];
  if (!(total > 0)) return NaN;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const [le, count] of cumulative) {
    if (count >= rank) {
      if (le === Infinity) return prevLe;
      if (count === prevCount) return le;
      return prevLe + (le - prevLe) * ((rank - prevCount) / (count - prevCount));
    }
    prevLe = le;
    prevCount = count;
  }
  return prevLe;
}

/**
 * One scrape summarised: request totals, 5xx totals and latency buckets of the gateway and
 * of the admin API (without the dashboard's own /metrics polls).
 */
export function summarise(samples, at) {
  const serverError = (l) => /^5/.test(String(l.status));
  const notMetrics = (l) => l.route !== '/metrics';
  return {
    at,
    gateway: {
      present: samples.some((s) => s.name.startsWith('trellis_gateway_')),
      total: sum(samples, 'trellis_gateway_requests_total'),
      errors: sum(samples, 'trellis_gateway_requests_total', serverError),
      buckets: buckets(samples, 'trellis_gateway_request_duration_seconds'),
    },
    admin: {
      present: true,
      total: sum(samples, 'trellis_admin_requests_total', notMetrics),
      errors: sum(samples, 'trellis_admin_requests_total', (l) => notMetrics(l) && serverError(l)),
      buckets: buckets(samples, 'trellis_admin_request_duration_seconds', notMetrics),
    },
  };
}

/** Rates between two summaries of the same family: {rps, eps, errorRatio, p50, p99}, or null. */
export function rates(now, before, family) {
  const a = now[family];
  const b = before[family];
  const dt = (now.at - before.at) / 1000;
  if (!(dt > 0) || a.total < b.total || a.errors < b.errors) return null;
  const requests = a.total - b.total;
  const errors = a.errors - b.errors;
  const delta = bucketDelta(a.buckets, b.buckets);
  return {
    rps: requests / dt,
    eps: errors / dt,
    errorRatio: requests > 0 ? errors / requests : 0,
    p50: delta ? quantile(0.5, delta) : NaN,
    p99: delta ? quantile(0.99, delta) : NaN,
  };
}
