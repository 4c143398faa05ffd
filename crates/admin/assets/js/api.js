// The admin API client of the dashboard: JSON over fetch on the same origin, with the
// admin token (asked for on the first 401, kept in this tab's session storage).

const TOKEN_KEY = 'trellis.admin.token';

/** An API call that failed; `status` is 0 when the server could not be reached. */
export class ApiError extends Error {
  constructor(status, kind, detail, path) {
    super(`${path}: ${status ? `HTTP ${status} ` : ''}${kind}: ${detail}`);
    this.name = 'ApiError';
    this.status = status;
    this.kind = kind;
    this.detail = detail;
    this.path = path;
  }

  /** True when this node has no such endpoint at all (the admin API's "no route" 404). */
  get unavailable() {
    return this.status === 404 && /^no route for /.test(this.detail);
  }
}

export function token() {
  try {
    return sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

function setToken(value) {
  try {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // Storage disabled: the token lives as long as this page.
  }
  memoryToken = value || null;
}

let memoryToken = null;
let pendingAsk = null;

/** Shows the token dialog; resolves with the token, or null when the user cancels. */
function askToken(refused) {
  if (pendingAsk) return pendingAsk;
  const dialog = document.getElementById('token-dialog');
  const form = document.getElementById('token-form');
  const input = document.getElementById('token-input');
  const error = document.getElementById('token-error');
  error.hidden = !refused;
  error.textContent = refused ? 'The server refused that token; check it and try again.' : '';
  input.value = '';
  pendingAsk = new Promise((resolve) => {
    const done = (value) => {
      form.removeEventListener('submit', onSubmit);
      dialog.removeEventListener('cancel', onCancel);
      if (dialog.open) dialog.close();
      pendingAsk = null;
      resolve(value);
    };
    const onSubmit = (event) => {
      event.preventDefault();
      done(input.value.trim() || null);
    };
    const onCancel = () => done(null);
    form.addEventListener('submit', onSubmit);
    dialog.addEventListener('cancel', onCancel);
    dialog.showModal();
    input.focus();
  });
  return pendingAsk;
}

/**
 * Calls the admin API. Resolves with the parsed JSON (or the text with `{text: true}`);
 * rejects with an ApiError naming the path, the status and the server's detail.
 */
export async function request(method, path, { body, text = false, signal } = {}) {
  let refused = false;
  for (let attempt = 0; attempt < 4; attempt++) {
    const headers = { accept: text ? 'text/plain' : 'application/json' };
    const current = token() || memoryToken;
    if (current) headers.authorization = `Bearer ${current}`;
    if (body !== undefined) headers['content-type'] = 'application/json';
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
        signal,
      });
    } catch (e) {
      if (e && e.name === 'AbortError') throw e;
      throw new ApiError(0, 'unreachable', `cannot reach the admin server (${e.message})`, path);
    }
    if (response.status === 401) {
      if (current) setToken(null);
      const given = await askToken(refused || Boolean(current));
      if (!given) throw new ApiError(401, 'unauthorized', 'this admin server needs a token and none was given', path);
      setToken(given);
      refused = true;
      continue;
    }
    const raw = await response.text();
    if (!response.ok) {
      let kind = 'http_error';
      let detail = raw.slice(0, 500) || response.statusText;
      try {
        const parsed = JSON.parse(raw);
        // `{"error": KIND, "detail": MESSAGE}`, or `{"error": MESSAGE}` from some modules.
        if (parsed.detail) {
          kind = parsed.error || kind;
          detail = parsed.detail;
        } else if (typeof parsed.error === 'string') {
          detail = parsed.error;
        }
      } catch {
        // Not JSON: keep the text.
      }
      throw new ApiError(response.status, kind, detail, path);
    }
    if (text) return raw;
    try {
      return JSON.parse(raw);
    } catch (e) {
      throw new ApiError(response.status, 'bad_response', `the answer is not JSON (${e.message})`, path);
    }
  }
  throw new ApiError(401, 'unauthorized', 'the server refused every token given', path);
}

export const get = (path, options) => request('GET', path, options);
export const post = (path, body, options) => request('POST', path, { ...options, body });

/** Encodes one path segment. */
export const seg = (s) => encodeURIComponent(s);

/** True when a token is in use (for the header). */
export function hasToken() {
  return Boolean(token() || memoryToken);
}
