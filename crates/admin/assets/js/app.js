// The dashboard shell: hash routing (#/page/arg/arg?query), the nav, and page lifecycles.

import { hasToken } from './api.js';
import { clear, errorNotice, h } from './dom.js';
import * as services from './pages/services.js';
import * as routes from './pages/routes.js';
import * as metrics from './pages/metrics.js';
import * as config from './pages/config.js';
import * as traces from './pages/traces.js';
import * as sagas from './pages/sagas.js';
import * as events from './pages/events.js';
import * as deployments from './pages/deployments.js';

const PAGES = { services, routes, metrics, config, traces, sagas, events, deployments };

const main = document.getElementById('main');
let current = null;

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, query = ''] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map((p) => decodeURIComponent(p));
  return { page: parts[0] || '', args: parts.slice(1), params: new URLSearchParams(query) };
}

/** Navigates to a hash route: go('services', name) or go('config', s, {env}). */
export function go(page, ...args) {
  const last = args.length && typeof args[args.length - 1] === 'object' ? args.pop() : null;
  const query = last ? new URLSearchParams(Object.entries(last).filter(([, v]) => v !== undefined && v !== null && v !== '')).toString() : '';
  location.hash = `#/${[page, ...args].map(encodeURIComponent).join('/')}${query ? `?${query}` : ''}`;
}

async function show() {
  const route = parseHash();
  if (!PAGES[route.page]) {
    location.replace('#/services');
    return;
  }
  if (current) {
    current.controller.abort();
    if (current.cleanup) current.cleanup();
  }
  const controller = new AbortController();
  const section = h('section', { 'data-page': route.page });
  const me = { controller, cleanup: null };
  current = me;
  clear(main).append(section);
  main.dataset.state = 'loading';
  section.append(h('p.muted', null, 'Loading…'));
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.page === route.page);
  try {
    me.cleanup = (await PAGES[route.page].render({ ...route, root: section, signal: controller.signal, go })) || null;
  } catch (e) {
    if (e && e.name === 'AbortError') return;
    clear(section).append(errorNotice(e, 'This page failed'));
  }
  if (current === me) {
    main.dataset.state = 'ready';
    document.getElementById('status').textContent = `${hasToken() ? 'token in use · ' : ''}updated ${new Date().toLocaleTimeString()}`;
  } else if (me.cleanup) {
    me.cleanup();
  }
}

window.addEventListener('hashchange', show);
show();
