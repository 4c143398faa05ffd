// Number and time formatting.

export function dateTime(ms) {
  if (!ms) return '—';
  const d = new Date(ms);
  return Number.isNaN(d.getTime()) ? '—' : d.toLocaleString();
}

export function ago(ms, now = Date.now()) {
  if (!ms) return '—';
  const s = Math.round((now - ms) / 1000);
  if (s < 0) return `in ${span(-s)}`;
  return `${span(s)} ago`;
}

function span(s) {
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d`;
}

/** Nanoseconds, humanly. */
export function nanos(ns) {
  if (ns === undefined || ns === null || Number.isNaN(Number(ns))) return '—';
  const n = Number(ns);
  if (n < 1e3) return `${n} ns`;
  if (n < 1e6) return `${(n / 1e3).toFixed(1)} µs`;
  if (n < 1e9) return `${(n / 1e6).toFixed(n < 1e7 ? 2 : 1)} ms`;
  return `${(n / 1e9).toFixed(2)} s`;
}

export function millis(ms) {
  return ms === undefined || ms === null ? '—' : nanos(Number(ms) * 1e6);
}

export function seconds(s) {
  return s === undefined || s === null || !Number.isFinite(s) ? '—' : nanos(s * 1e9);
}

/** A short number: 1234 → 1.23k. */
export function num(x, digits = 2) {
  if (x === undefined || x === null || !Number.isFinite(x)) return '—';
  const a = Math.abs(x);
  if (a >= 1e6) return `${(x / 1e6).toFixed(digits)}M`;
  if (a >= 1e3) return `${(x / 1e3).toFixed(digits)}k`;
  if (Number.isInteger(x) || a >= 10) return `${Math.round(x * 10) / 10}`;
  return x.toFixed(digits);
}

export function percent(x) {
  return x === undefined || x === null || !Number.isFinite(x) ? '—' : `${(x * 100).toFixed(x < 0.1 ? 2 : 1)}%`;
}
