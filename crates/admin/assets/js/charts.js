// Hand-written SVG line charts.

import { h } from './dom.js';

const NS = 'http://www.w3.org/2000/svg';
const W = 600;
const H = 180;
const PAD = { left: 52, right: 10, top: 10, bottom: 22 };

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) if (c) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

/**
 * A line chart of series [{name, points: [[unixMs, value]]}] over the last `windowMs`.
 * Missing values (NaN) break the line. `format` labels the y axis.
 */
export function lineChart({ title, series, windowMs, now = Date.now(), format = String }) {
  const from = now - windowMs;
  const visible = series.map((s) => s.points.filter(([t, v]) => t >= from && Number.isFinite(v)));
  const count = visible.reduce((n, p) => n + p.length, 0);
  const max = Math.max(0, ...visible.flat().map(([, v]) => v));
  const top = max > 0 ? max * 1.15 : 1;
  const x = (t) => PAD.left + ((t - from) / windowMs) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);
  const chart = svg('svg', {
    class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': title, 'data-points': count,
  });
  for (const frac of [0, 0.5, 1]) {
    const v = top * frac;
    chart.append(svg('line', { class: frac === 0 ? 'axis' : 'grid', x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v) }));
    chart.append(svg('text', { x: PAD.left - 4, y: y(v) + 3, 'text-anchor': 'end' }, format(v)));
  }
  chart.append(svg('text', { x: PAD.left, y: H - 6 }, `-${Math.round(windowMs / 60000)}m`));
  chart.append(svg('text', { x: W - PAD.right, y: H - 6, 'text-anchor': 'end' }, 'now'));
  series.forEach((s, i) => {
    // Split at gaps so a missing sample does not draw a false line.
    let run = [];
    const flush = () => {
      if (run.length === 1) chart.append(svg('circle', { class: `series-${i}`, cx: run[0][0], cy: run[0][1], r: 1.5 }));
      if (run.length > 1) chart.append(svg('polyline', { class: `series-${i}`, points: run.map((p) => p.join(',')).join(' ') }));
      run = [];
    };
    for (const [t, v] of s.points) {
      if (t < from) continue;
      if (Number.isFinite(v)) run.push([x(t).toFixed(1), y(v).toFixed(1)]);
      else flush();
    }
    flush();
  });
  if (count === 0) {
    chart.append(svg('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle' }, 'waiting for two scrapes…'));
  }
  const legend = h('div.legend', null, series.map((s, i) => h('span', null, h('span.swatch', { class: `swatch-${i}` }), s.name)));
  return h('div.card', null, h('strong', null, title), legend, chart);
}
