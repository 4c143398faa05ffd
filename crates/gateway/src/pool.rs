//! A lean HTTP/1.1 client and connection pool towards upstream instances.
//!
//! hyper-util's legacy client runs every pooled connection in a task of its own: a request
//! is handed to that task over a channel and its response comes back over another, two
//! task wake-ups per request, and all connections sit behind one mutex. hyper's own client
//! connection, driven inline, still costs about as much as the rest of the gateway. Here
//! the task serving the client speaks HTTP/1.1 itself: [`Pool::send`] writes the request
//! head and the body frames at hand with one `write` (the rest of a streaming body after
//! it), parses the response head with httparse, and the response body ([`PooledBody`])
//! reads the connection as it is polled. When the body has been read to its end the
//! connection goes back to the pool, idle and untouched by any task; a connection taken
//! from the pool is checked first (a read that finds the upstream closed it, or bytes it
//! should not have sent, drops it), and a request whose first write fails on a reused
//! connection is sent on another one.
//!
//! The request body is sent whole before the response is read: an upstream that answers
//! early without reading a large body is cut off by the route's timeout.
//!
//! Used for plain HTTP/1.1 requests; upgrades (WebSocket) and h2c go through hyper-util's
//! client, which handles both.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::h1::{
    Decoded, Decoder, Framing, Indices, answer_length, header_indices, is_hop_by_hop_name,
};
use crate::proxy::{
    Body, BoxError, REQUEST_ID, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
};

/// Most headers accepted in a response head.
const MAX_HEADERS: usize = 100;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
const READ_SIZE: usize = 8 * 1024;
/// Request body frames up to this size are copied behind the head into one write.
const COPY_LIMIT: usize = 16 * 1024;

/// Why a request could not be sent to an upstream instance.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    /// The TCP connection could not be opened.
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        authority: Authority,
        #[source]
        source: std::io::Error,
    },
    /// The TCP connection was not opened in time.
    #[error("cannot connect to {authority}: no answer within {after:?}")]
    ConnectTimeout {
        authority: Authority,
        after: Duration,
    },
    /// The request failed on the connection (reset, closed, malformed answer, or an error
    /// of the request body, found in the source chain).
    #[error("request failed")]
    Request(#[source] ClientError),
}

/// What went wrong on an upstream connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// The upstream closed the connection before its answer was complete.
    #[error("connection closed before the end of the answer")]
    Closed,
    /// The answer is not HTTP/1.x as this client reads it.
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
    /// Reading or writing the connection failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The request body failed (the client's fault, usually).
    #[error("request body failed")]
    RequestBody(#[source] BoxError),
    /// The response body is malformed.
    #[error("response body: {0}")]
    ResponseBody(#[source] crate::h1::BodyError),
}

/// An upstream connection with its read buffer.
struct Conn {
    io: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// Reads what the socket has: `Ready(Ok(0))` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 2 {
            self.buf.reserve(READ_SIZE);
        }
        loop {
            match crate::h1::read_buf(&self.io, &mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.io.poll_read_ready(cx))?;
                }
                result => return Poll::Ready(result),
            }
        }
    }

    /// Whether the idle connection is still usable: nothing to read, not closed.
    fn is_idle_and_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        if self.buf.capacity() < READ_SIZE / 2 {
            self.buf.reserve(READ_SIZE);
        }
        // Nothing to read is what an idle connection looks like; data or the end of the
        // stream mean it is not. (While the socket is not known readable this is a check
        // of its readiness, no system call; registering for readiness is left to the read
        // of the answer.)
        matches!(
            crate::h1::read_buf(&self.io, &mut self.buf),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }
}

/// Writes all of `bytes`; on error, how much was written.
async fn write_all(io: &TcpStream, bytes: &[u8]) -> Result<(), (io::Error, usize)> {
    let mut written = 0;
    while written < bytes.len() {
        match io.try_write(&bytes[written..]) {
            Ok(0) => return Err((io::ErrorKind::WriteZero.into(), written)),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = io.writable().await {
                    return Err((e, written));
                }
            }
            Err(e) => return Err((e, written)),
        }
    }
    Ok(())
}

/// Idle connections by upstream address, looked up twice per request (checkout and
/// release): a fast hasher, the addresses being the registry's.
type IdleMap = HashMap<Box<str>, Vec<Idle>, foldhash::fast::RandomState>;

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Idle keep-alive connections per upstream authority, one set per worker thread.
pub(crate) struct Pool {
    /// One per gateway worker thread (see [`set_worker_slot`]): a connection is
    /// registered with the reactor of the thread that opened it, and is only handed to
    /// requests served by that thread. Each slot keyed by the authority's text:
    /// `Authority`'s own `Hash` feeds the hasher one lower-cased byte at a time, a cost
    /// paid twice per request here. (Authorities come from registry records, so their
    /// case does not vary.)
    slots: Box<[Mutex<IdleMap>]>,
    max_idle_per_host: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    /// When the pool was made: the origin of `next_sweep`.
    created: Instant,
    /// Milliseconds after `created` when idle connections are next swept.
    next_sweep: AtomicU64,
}

/// A slot's map, poisoned or not: it is only pushed to, popped from and swept.
fn lock(slot: &Mutex<IdleMap>) -> MutexGuard<'_, IdleMap> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A duration in whole milliseconds (saturating).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

thread_local! {
    /// The pool slot of the gateway worker running on this thread (0 elsewhere).
    static WORKER_SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes this thread use pool slot `slot` (a gateway worker thread, at its start).
pub(crate) fn set_worker_slot(slot: usize) {
    WORKER_SLOT.set(slot);
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sending {
    Length,
    Chunked,
}

impl Pool {
    /// A pool with `slots` sets of idle connections (one per worker thread; at least 1).
    pub(crate) fn new(
        slots: usize,
        max_idle_per_host: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Pool {
            slots: (0..slots.max(1))
                .map(|_| Mutex::new(IdleMap::default()))
                .collect(),
            max_idle_per_host,
            idle_timeout,
            connect_timeout,
            created: Instant::now(),
            next_sweep: AtomicU64::new(millis(idle_timeout)),
        })
    }

    /// This thread's slot.
    fn slot(&self) -> MutexGuard<'_, IdleMap> {
        lock(&self.slots[WORKER_SLOT.get() % self.slots.len()])
    }

    /// A pooled connection to `authority` that is still open and, at `now`, has been idle
    /// no longer than the idle timeout, if any.
    fn checkout(&self, authority: &Authority, now: Instant) -> Option<Conn> {
        loop {
            let idle = self.slot().get_mut(authority.as_str())?.pop()?;
            let mut conn = idle.conn;
            if now.saturating_duration_since(idle.since) > self.idle_timeout
                || !conn.is_idle_and_open()
            {
                continue;
            }
            return Some(conn);
        }
    }

    fn put(&self, authority: &Authority, conn: Conn) {
        let now = Instant::now();
        {
            let mut slot = self.slot();
            let entry = Idle { conn, since: now };
            match slot.get_mut(authority.as_str()) {
                Some(list) if list.len() < self.max_idle_per_host => list.push(entry),
                Some(_) => {}
                None if self.max_idle_per_host > 0 => {
                    slot.insert(authority.as_str().into(), vec![entry]);
                }
                None => {}
            }
        }
        self.sweep(now);
    }

    /// Every idle timeout, closes the connections idle for longer (of instances no longer
    /// used, too) in every slot: a worker that gets no more requests does not keep its
    /// connections open (half-closed by the upstream) for ever. One thread sweeps; the
    /// others only read when the next sweep is due.
    fn sweep(&self, now: Instant) {
        let at = millis(now.duration_since(self.created));
        let due = self.next_sweep.load(Ordering::Relaxed);
        if at < due
            || self
                .next_sweep
                .compare_exchange(
                    due,
                    at.saturating_add(millis(self.idle_timeout)),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        let mut stale = Vec::new();
        for slot in &self.slots {
            let mut slot = lock(slot);
            for list in slot.values_mut() {
                let (keep, old): (Vec<Idle>, Vec<Idle>) = list
                    .drain(..)
                    .partition(|i| now.duration_since(i.since) <= self.idle_timeout);
                *list = keep;
                stale.extend(old);
            }
            slot.retain(|_, list| !list.is_empty());
        }
        // Closed outside the locks.
        drop(stale);
    }

    async fn connect(&self, authority: &Authority) -> Result<Conn, PoolError> {
        let address = (
            authority.host().trim_matches(['[', ']']),
            authority.port_u16().unwrap_or(80),
        );
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| PoolError::ConnectTimeout {
                authority: authority.clone(),
                after: self.connect_timeout,
            })?
            .map_err(|source| PoolError::Connect {
                authority: authority.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            io: stream,
            buf: BytesMut::with_capacity(READ_SIZE),
        })
    }

    /// Sends `request` (origin-form URI; `Host` set, or given in `forwarding`) to
    /// `authority` on a pooled or new connection, driving the connection from the calling
    /// task. The answer's headers come beside it, as received (see [`RawHeaders`]).
    /// `now`: when the caller started the request (a pooled connection idle for longer
    /// than the idle timeout at that time is not used), read by the caller, which needs
    /// the time anyway: a clock read costs tens of nanoseconds in a virtual machine.
    pub(crate) async fn send(
        self: &Arc<Self>,
        authority: &Authority,
        request: Request<Body>,
        forwarding: Option<&Forwarding<'_>>,
        now: Instant,
    ) -> Result<(Response<Body>, RawHeaders), PoolError> {
        let (parts, mut body) = request.into_parts();
        let head_request = parts.method == Method::HEAD;
        let mut out = Vec::with_capacity(1024);
        let sending = encode_head(&parts, &body, forwarding, &mut out);
        let mut ended = body.is_end_stream();
        if !ended {
            ended = gather(&mut body, &mut out, sending)
                .await
                .map_err(|e| PoolError::Request(ClientError::RequestBody(e)))?;
        }
        // The first write: on a reused connection the upstream may have closed meanwhile;
        // if nothing was written, another connection gets the request.
        let mut conn = loop {
            let (conn, reused) = match self.checkout(authority, now) {
                Some(conn) => (conn, true),
                None => (self.connect(authority).await?, false),
            };
            match write_all(&conn.io, &out).await {
                Ok(()) => break conn,
                Err((_, 0)) if reused => continue,
                Err((e, _)) => return Err(PoolError::Request(e.into())),
            }
        };
        while !ended {
            out.clear();
            ended = gather(&mut body, &mut out, sending)
                .await
                .map_err(|e| PoolError::Request(ClientError::RequestBody(e)))?;
            if !out.is_empty() {
                write_all(&conn.io, &out)
                    .await
                    .map_err(|(e, _)| PoolError::Request(e.into()))?;
            }
        }
        drop(body);
        let (head, raw, decoder, reusable) = poll_fn(|cx| read_head(&mut conn, cx, head_request))
            .await
            .map_err(PoolError::Request)?;
        let body = PooledBody {
            conn: Some(conn),
            decoder,
            reusable,
            authority: authority.clone(),
            pool: Arc::clone(self),
        };
        Ok((Response::from_parts(head, body.boxed()), raw))
    }
}

/// What a proxied request says about where it came from, written by [`Pool::send`] after
/// the request's own headers, of which those of the same names are left out. (Written,
/// not put into the request's `HeaderMap`: five inserts into the map cost about as much
/// as encoding the whole head.) Requests sent by hyper's client get them in their map
/// ([`Forwarding::insert_into`]).
pub(crate) struct Forwarding<'a> {
    /// `Host`: the instance's address (`None` before one is picked; only [`Pool::send`]
    /// writes it).
    pub(crate) host: Option<&'a HeaderValue>,
    /// The caller's address, added to `X-Forwarded-For`.
    pub(crate) peer_ip: &'a HeaderValue,
    /// `X-Forwarded-Host`: the host the caller asked for, when it named one.
    pub(crate) forwarded_host: Option<&'a HeaderValue>,
    /// `X-Request-Id`.
    pub(crate) request_id: &'a HeaderValue,
    /// The client span's trace context, as header lines ([`trellis_tracing::HeadLines`]):
    /// written as they are by [`Pool::send`] (empty when not tracing; hyper's client gets
    /// the span's headers in the request's map instead).
    pub(crate) trace: &'a [u8],
}

impl Forwarding<'_> {
    /// Whether a request's own header of this name gives way to the forwarding ones.
    pub(crate) fn replaces(name: &HeaderName) -> bool {
        *name == header::HOST
            || *name == X_FORWARDED_FOR
            || *name == X_FORWARDED_PROTO
            || *name == X_FORWARDED_HOST
            || *name == REQUEST_ID
    }

    /// The request's own `X-Forwarded-For` (its first), when it is a list to extend:
    /// text, as `HeaderValue::to_str` sees it.
    fn previous_hops(own: Option<&HeaderValue>) -> Option<&HeaderValue> {
        own.filter(|v| v.to_str().is_ok())
    }

    /// Puts the headers into a request's map, replacing its own of those names, but for
    /// `Host`, which goes: hyper's client sets it from the request's URI.
    pub(crate) fn insert_into(&self, headers: &mut HeaderMap) {
        headers.remove(header::HOST);
        let forwarded_for = match Self::previous_hops(headers.get(X_FORWARDED_FOR)) {
            Some(previous) => HeaderValue::from_bytes(
                &[previous.as_bytes(), b", ", self.peer_ip.as_bytes()].concat(),
            )
            .unwrap_or_else(|_| self.peer_ip.clone()),
            None => self.peer_ip.clone(),
        };
        headers.insert(X_FORWARDED_FOR, forwarded_for);
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        if let Some(host) = self.forwarded_host {
            headers.insert(X_FORWARDED_HOST, host.clone());
        }
        headers.insert(REQUEST_ID, self.request_id.clone());
    }

    /// Appends the header lines; `previous_for` is the request's own `X-Forwarded-For`.
    fn encode(&self, previous_for: Option<&HeaderValue>, out: &mut Vec<u8>) {
        let mut line = |name: &[u8], parts: &[&[u8]]| {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            for part in parts {
                out.extend_from_slice(part);
            }
            out.extend_from_slice(b"\r\n");
        };
        if let Some(host) = self.host {
            line(b"host", &[host.as_bytes()]);
        }
        match Self::previous_hops(previous_for) {
            Some(previous) => line(
                X_FORWARDED_FOR.as_str().as_bytes(),
                &[previous.as_bytes(), b", ", self.peer_ip.as_bytes()],
            ),
            None => line(
                X_FORWARDED_FOR.as_str().as_bytes(),
                &[self.peer_ip.as_bytes()],
            ),
        }
        line(X_FORWARDED_PROTO.as_str().as_bytes(), &[b"http"]);
        if let Some(host) = self.forwarded_host {
            line(X_FORWARDED_HOST.as_str().as_bytes(), &[host.as_bytes()]);
        }
        line(
            REQUEST_ID.as_str().as_bytes(),
            &[self.request_id.as_bytes()],
        );
        out.extend_from_slice(self.trace);
    }
}

/// Writes the request line and headers (with `forwarding`'s in place of the request's
/// own of those names), with the body's framing; returns it.
fn encode_head(
    parts: &http::request::Parts,
    body: &Body,
    forwarding: Option<&Forwarding<'_>>,
    out: &mut Vec<u8>,
) -> Sending {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_length = false;
    let mut previous_for = None;
    for (name, value) in &parts.headers {
        if *name == header::TRANSFER_ENCODING {
            continue;
        }
        if forwarding.is_some() && Forwarding::replaces(name) {
            if *name == X_FORWARDED_FOR && previous_for.is_none() {
                previous_for = Some(value);
            }
            continue;
        }
        has_length |= *name == header::CONTENT_LENGTH;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(forwarding) = forwarding {
        forwarding.encode(previous_for, out);
    }
    let sending = if has_length {
        Sending::Length
    } else if let Some(n) = body.size_hint().exact() {
        if n > 0 || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Sending::Length
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Sending::Chunked
    };
    out.extend_from_slice(b"\r\n");
    sending
}

/// Appends the body frames at hand to `out` (waiting for one when `out` is empty);
/// `Ok(true)` at the end of the body.
async fn gather(body: &mut Body, out: &mut Vec<u8>, sending: Sending) -> Result<bool, BoxError> {
    loop {
        let pending_out = !out.is_empty();
        let polled = poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending if pending_out => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
        })
        .await;
        match polled {
            None => return Ok(false),
            Some(None) => {
                if sending == Sending::Chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                return Ok(true);
            }
            Some(Some(Err(e))) => return Err(e),
            Some(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                if sending == Sending::Chunked {
                    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                }
                out.extend_from_slice(&data);
                if sending == Sending::Chunked {
                    out.extend_from_slice(b"\r\n");
                }
                if out.len() >= COPY_LIMIT {
                    return Ok(false);
                }
            }
        }
    }
}

/// A response head as read: status and version, the headers, how the body is read, and
/// whether the connection may be reused after it.
type ReadHead = (http::response::Parts, RawHeaders, Body2, bool);

/// Reads the response head (skipping interim 1xx answers). The headers have no hop-by-hop
/// ones but for a 101 (this is a proxy's client: they describe this connection only).
fn read_head(
    conn: &mut Conn,
    cx: &mut Context<'_>,
    head_request: bool,
) -> Poll<Result<ReadHead, ClientError>> {
    loop {
        if !conn.buf.is_empty() {
            match parse_response(&mut conn.buf, head_request)? {
                Some(Parsed::Interim) => continue,
                Some(Parsed::Head(head)) => return Poll::Ready(Ok(head)),
                None => {}
            }
        }
        if ready!(conn.poll_fill(cx))? == 0 {
            return Poll::Ready(Err(ClientError::Closed));
        }
    }
}

/// How the response body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body2 {
    /// Framed by length or chunks.
    Framed(Decoder),
    /// Until the upstream closes.
    UntilClose,
}

enum Parsed {
    Interim,
    Head(ReadHead),
}

fn parse_response(buf: &mut BytesMut, head_request: bool) -> Result<Option<Parsed>, ClientError> {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let used = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(ClientError::Malformed("head too large")),
        Err(_) => return Err(ClientError::Malformed("invalid response head")),
    };
    let code = response.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| ClientError::Malformed("invalid status"))?;
    if status.is_informational() && code != 101 {
        let _ = buf.split_to(used);
        return Ok(Some(Parsed::Interim));
    }
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut indices = Vec::with_capacity(response.headers.len());
    header_indices(&buf[..used], response.headers, &mut indices)
        .ok_or(ClientError::Malformed("invalid response head"))?;
    let head = buf.split_to(used).freeze();
    let mut length = None;
    let mut chunked = None;
    let mut close = version == Version::HTTP_10;
    // Hop-by-hop headers are read here and left out of the answer (a 101 keeps them: the
    // switch is passed through); so are the headers `Connection` names.
    let keep_hop_by_hop = code == 101;
    // `Connection` values that name other headers.
    let mut listing: Vec<(usize, usize)> = Vec::new();
    let mut lines = indices;
    let mut kept = 0;
    for i in 0..lines.len() {
        let (ns, ne, vs, ve) = lines[i];
        let (name, value) = (&head[ns..ne], &head[vs..ve]);
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = answer_length(value).ok_or(ClientError::Malformed("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(ClientError::Malformed("conflicting content-length"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = value.rsplit(|b| *b == b',').next().unwrap_or(b"");
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            let mut names_others = false;
            for token in value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    if version == Version::HTTP_10 {
                        close = false;
                    }
                } else if !token.is_empty() {
                    names_others = true;
                }
            }
            if names_others {
                listing.push((vs, ve));
            }
        }
        if keep_hop_by_hop || !is_hop_by_hop_name(name) {
            lines[kept] = lines[i];
            kept += 1;
        }
    }
    lines.truncate(kept);
    if !listing.is_empty() && !keep_hop_by_hop {
        let named: Vec<&[u8]> = listing
            .iter()
            .flat_map(|&(vs, ve)| head[vs..ve].split(|b| *b == b',').map(<[u8]>::trim_ascii))
            .collect();
        lines.retain(|&(ns, ne, _, _)| {
            !named
                .iter()
                .any(|token| token.eq_ignore_ascii_case(&head[ns..ne]))
        });
    }
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let body = if no_body {
        Body2::Framed(Decoder::new(Framing::None))
    } else {
        match (chunked, length) {
            (Some(true), _) => {
                // Chunked wins over a length (RFC 9112 §6.3); the connection is not reused.
                close |= length.is_some();
                Body2::Framed(Decoder::new(Framing::Chunked))
            }
            (Some(false), _) => Body2::UntilClose,
            (None, Some(n)) => Body2::Framed(Decoder::new(if n == 0 {
                Framing::None
            } else {
                Framing::Length(n)
            })),
            (None, None) => Body2::UntilClose,
        }
    };
    let reusable = !close && code != 101 && body != Body2::UntilClose;
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    Ok(Some(Parsed::Head((
        response.into_parts().0,
        RawHeaders { head, lines },
        body,
        reusable,
    ))))
}

/// An upstream answer's end-to-end headers as they came: the head's bytes and where each
/// header lies in them (hop-by-hop ones left out). The pool returns them beside the answer
/// instead of in its `HeaderMap`: a proxied answer's headers are copied out as received
/// (names in their case), never parsed into names and values. The `HeaderMap` holds what
/// the gateway adds, and wins over a received header of the same name; [`materialize`]
/// moves them into the map for code that reads or edits them.
#[derive(Debug, Clone)]
pub(crate) struct RawHeaders {
    head: Bytes,
    lines: Vec<Indices>,
}

impl RawHeaders {
    /// Each header's name and value, in the order received.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.lines
            .iter()
            .map(|&(ns, ne, vs, ve)| (&self.head[ns..ne], &self.head[vs..ve]))
    }
}

/// Moves the received headers of an answer (see [`RawHeaders`]) into its `HeaderMap`,
/// after the headers already there, except those the map already names.
pub(crate) fn materialize(headers: &mut HeaderMap, raw: Option<RawHeaders>) {
    let Some(raw) = raw else {
        return;
    };
    let own: Vec<HeaderName> = headers.keys().cloned().collect();
    for &(ns, ne, vs, ve) in &raw.lines {
        // The parser checked both as HTTP tokens and field values.
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&raw.head[ns..ne]),
            HeaderValue::from_maybe_shared(raw.head.slice(vs..ve)),
        ) else {
            continue;
        };
        if !own.contains(&name) {
            headers.append(name, value);
        }
    }
}

/// A response body that reads its connection and hands it back to the pool when read to
/// the end (a body dropped before its end closes the connection).
struct PooledBody {
    /// `None` once the connection ended or went back to the pool.
    conn: Option<Conn>,
    decoder: Body2,
    reusable: bool,
    authority: Authority,
    pool: Arc<Pool>,
}

impl PooledBody {
    fn finished(&self) -> bool {
        self.decoder == Body2::Framed(Decoder::Done)
    }

    fn release(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
        {
            self.pool.put(&self.authority, conn);
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = &mut this.conn else {
                return Poll::Ready(if this.finished() {
                    None
                } else {
                    Some(Err(Box::new(ClientError::Closed)))
                });
            };
            match &mut this.decoder {
                Body2::Framed(decoder) => match decoder.decode(&mut conn.buf, MAX_HEAD) {
                    Ok(Decoded::Data(data)) => {
                        if this.finished() {
                            this.release();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Decoded::End) => {
                        this.release();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(Box::new(ClientError::ResponseBody(e)))));
                    }
                },
                Body2::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            let Some(conn) = &mut this.conn else {
                continue;
            };
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    this.conn = None;
                    if this.decoder == Body2::UntilClose {
                        this.decoder = Body2::Framed(Decoder::Done);
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(Box::new(ClientError::Closed))));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Box::new(ClientError::Io(e)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Body2::Framed(Decoder::Length(n)) => SizeHint::with_exact(n),
            Body2::Framed(Decoder::Done) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An upstream answering each request with the next of `answers` (closing the
    /// connection after one ending in `"CLOSE"`, the marker itself not sent); it records
    /// each request as received and counts connections.
    async fn upstream(
        answers: Vec<&'static str>,
    ) -> (Authority, Arc<Mutex<Vec<String>>>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (seen2, accepted2) = (seen.clone(), accepted.clone());
        let answers = Arc::new(Mutex::new(answers.into_iter()));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                accepted2.fetch_add(1, Ordering::SeqCst);
                let (seen, answers) = (seen2.clone(), answers.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // A request: head, then a body by content-length or chunked.
                        let complete = |buf: &[u8]| -> Option<usize> {
                            let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
                            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                            if head.contains("transfer-encoding: chunked") {
                                let at = buf[end..].windows(5).position(|w| w == b"0\r\n\r\n")?;
                                return Some(end + at + 5);
                            }
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: "))
                                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                            (buf.len() >= end + length).then_some(end + length)
                        };
                        let used = loop {
                            if let Some(used) = complete(&buf) {
                                break used;
                            }
                            let n = stream.read(&mut chunk).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        };
                        seen.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&buf[..used]).into_owned());
                        buf.drain(..used);
                        let Some(answer) = answers.lock().unwrap().next() else {
                            return;
                        };
                        let (answer, close) = match answer.strip_suffix("CLOSE") {
                            Some(answer) => (answer, true),
                            None => (answer, false),
                        };
                        stream.write_all(answer.as_bytes()).await.unwrap();
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (authority, seen, accepted)
    }

    fn request(method: Method, body: Body) -> Request<Body> {
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = http::Uri::from_static("/p?q=1");
        request
            .headers_mut()
            .insert(header::HOST, HeaderValue::from_static("up"));
        request
    }

    fn full(text: &'static str) -> Body {
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed()
    }

    async fn text(response: Response<Body>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn pool() -> Arc<Pool> {
        Pool::new(1, 8, Duration::from_secs(60), Duration::from_secs(1))
    }

    /// The answer with its received headers moved into its map (see [`RawHeaders`]).
    fn received((response, raw): (Response<Body>, RawHeaders)) -> Response<Body> {
        let (mut parts, body) = response.into_parts();
        assert!(
            parts.headers.is_empty(),
            "the pool adds no header of its own"
        );
        materialize(&mut parts.headers, Some(raw));
        Response::from_parts(parts, body)
    }

    #[tokio::test]
    async fn answers_of_every_framing_and_connection_reuse() {
        let (authority, seen, accepted) = upstream(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\nconnection: keep-alive, X-B\r\nx-b: 2\r\nkeep-alive: timeout=5\r\nx-c: 3\r\n\r\nhello",
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n2\r\nde\r\n0\r\nt: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            "HTTP/1.1 204 No Content\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\nuntil closeCLOSE",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nokCLOSE",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        let pool = pool();
        let response = pool
            .send(
                &authority,
                request(Method::GET, crate::proxy::empty()),
                None,
                Instant::now(),
            )
            .await
            .unwrap();
        let raw: Vec<_> = response
            .1
            .iter()
            .map(|(name, value)| (name.to_vec(), value.to_vec()))
            .collect();
        assert_eq!(raw.len(), 3, "content-length, x-a and x-c, as received");
        let response = received(response);
        assert_eq!(response.headers()["x-a"], "1");
        assert_eq!(response.headers()["x-c"], "3");
        // Hop-by-hop headers, and those `Connection` names, describe this connection only.
        for gone in ["connection", "keep-alive", "x-b"] {
            assert!(!response.headers().contains_key(gone), "{gone}");
        }
        assert_eq!(text(response).await, "hello");
        let response = pool
            .send(
                &authority,
                request(Method::POST, full("body")),
                None,
                Instant::now(),
            )
            .await
            .map(received)
            .unwrap();
        assert_eq!(response.status(), 201);
        assert!(!response.headers().contains_key("transfer-encoding"));
        assert_eq!(text(response).await, "abcde");
        let response = pool
            .send(
                &authority,
                request(Method::HEAD, crate::proxy::empty()),
                None,
                Instant::now(),
            )
            .await
            .map(received)
            .unwrap();
        assert_eq!(response.headers()["content-length"], "9");
        assert_eq!(text(response).await, "");
        let response = pool
            .send(
                &authority,
                request(Method::DELETE, crate::proxy::empty()),
                None,
                Instant::now(),
            )
            .await
            .unwrap()
            .0;
        assert_eq!(response.status(), 204);
        assert_eq!(text(response).await, "");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one kept-alive connection so far"
        );
        let response = pool
            .send(
                &authority,
                request(Method::GET, crate::proxy::empty()),
                None,
                Instant::now(),
            )
            .await
            .unwrap()
            .0;
        assert_eq!(text(response).await, "until close");
        let response = pool
            .send(
                &authority,
                request(Method::GET, crate::proxy::empty()),
                None,
                Instant::now(),
            )
            .await
            .unwrap()
            .0;
        assert_eq!(text(response).await, "ok");
        let response = pool
            .send(
                &authority,
                request(Method::GET, crate::proxy::empty()),
                None,
                Instant::now(),
            )
            .await
            .unwrap()
            .0;
        assert_eq!(text(response).await, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "closed connections are replaced"
        );
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0], "GET /p?q=1 HTTP/1.1\r\nhost: up\r\n\r\n");
        assert_eq!(
            seen[1],
            "POST /p?q=1 HTTP/1.1\r\nhost: up\r\ncontent-length: 4\r\n\r\nbody"
        );
    }

    /// The forwarding both tests below use: instance `10.1.2.3:8080`, caller `127.0.0.1`,
    /// asked for `api.example`, request id `id-1`.
    struct SampleForwarding([HeaderValue; 4]);

    impl SampleForwarding {
        fn new() -> Self {
            SampleForwarding(
                ["10.1.2.3:8080", "127.0.0.1", "api.example", "id-1"].map(HeaderValue::from_static),
            )
        }

        fn forwarding(&self) -> Forwarding<'_> {
            let [host, peer_ip, asked, id] = &self.0;
            Forwarding {
                host: Some(host),
                peer_ip,
                forwarded_host: Some(asked),
                request_id: id,
                trace: b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00\r\n",
            }
        }
    }

    #[tokio::test]
    async fn forwarding_headers_take_the_place_of_the_requests_own() {
        let (authority, seen, _) =
            upstream(vec!["HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"; 3]).await;
        let pool = pool();
        let sample = SampleForwarding::new();
        let forwarding = sample.forwarding();
        // A caller's own forwarding headers: its X-Forwarded-For list (the first of two)
        // grows; the others are replaced. Names match whatever their case on the wire.
        let mut spoofed = request(Method::GET, crate::proxy::empty());
        for (name, value) in [
            ("x-forwarded-for", "10.0.0.1, 10.0.0.2"),
            ("x-forwarded-for", "10.9.9.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("x-request-id", "mine"),
            ("x-other", "kept"),
        ] {
            spoofed
                .headers_mut()
                .append(name, HeaderValue::from_static(value));
        }
        let plain = request(Method::GET, crate::proxy::empty());
        // A list that is not text (obs-text) is not carried on.
        let mut binary = request(Method::GET, crate::proxy::empty());
        binary.headers_mut().insert(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"10.0.0.1 \xff").unwrap(),
        );
        for request in [spoofed, plain, binary] {
            let (response, _) = pool
                .send(&authority, request, Some(&forwarding), Instant::now())
                .await
                .unwrap();
            assert_eq!(text(response).await, "");
        }
        let seen = seen.lock().unwrap();
        let tail = "x-forwarded-proto: http\r\nx-forwarded-host: api.example\r\n\
                    x-request-id: id-1\r\n\
                    traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00\r\n\r\n";
        assert_eq!(
            seen[0],
            format!(
                "GET /p?q=1 HTTP/1.1\r\nx-other: kept\r\nhost: 10.1.2.3:8080\r\n\
                 x-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1\r\n{tail}"
            )
        );
        for plain in &seen[1..] {
            assert_eq!(
                *plain,
                format!(
                    "GET /p?q=1 HTTP/1.1\r\nhost: 10.1.2.3:8080\r\n\
                     x-forwarded-for: 127.0.0.1\r\n{tail}"
                )
            );
        }
    }

    #[test]
    fn forwarding_headers_in_a_map_for_hypers_client() {
        let sample = SampleForwarding::new();
        let forwarding = sample.forwarding();
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("host", "api.example"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.9.9.9"),
            ("x-forwarded-proto", "https"),
            ("x-request-id", "mine"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        forwarding.insert_into(&mut headers);
        assert!(!headers.contains_key("host"), "hyper sets it from the URI");
        let all = |name: &str| -> Vec<&HeaderValue> { headers.get_all(name).iter().collect() };
        assert_eq!(all("x-forwarded-for"), ["10.0.0.1, 127.0.0.1"]);
        assert_eq!(all("x-forwarded-proto"), ["http"]);
        assert_eq!(all("x-forwarded-host"), ["api.example"]);
        assert_eq!(all("x-request-id"), ["id-1"]);
        assert!(
            !headers.contains_key("traceparent"),
            "the span writes its own"
        );
    }

    #[tokio::test]
    async fn each_worker_has_its_own_connections_and_every_slot_is_swept() {
        let (authority, _, accepted) =
            upstream(vec!["HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"; 100]).await;
        let pool = Pool::new(2, 8, Duration::from_millis(50), Duration::from_secs(1));
        let idle = |slot: usize| -> usize {
            pool.slots[slot]
                .lock()
                .unwrap()
                .values()
                .map(Vec::len)
                .sum()
        };
        let get = || async {
            let response = pool
                .send(
                    &authority,
                    request(Method::GET, crate::proxy::empty()),
                    None,
                    Instant::now(),
                )
                .await
                .unwrap()
                .0;
            // Read to its end: the connection goes back to this thread's slot.
            assert_eq!(text(response).await, "ok");
        };
        set_worker_slot(1);
        get().await;
        assert_eq!((idle(0), idle(1)), (0, 1));
        // Worker 0 does not take worker 1's connection (registered with its reactor).
        set_worker_slot(0);
        get().await;
        assert_eq!((idle(0), idle(1)), (1, 1));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Worker 1 gets no more requests: once its connection has been idle longer than
        // the timeout, a release on worker 0 closes it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while idle(1) > 0 {
            assert!(Instant::now() < deadline, "slot 1 never swept");
            tokio::time::sleep(Duration::from_millis(10)).await;
            get().await;
        }
        assert_eq!(idle(0), 1, "worker 0 keeps its fresh connection");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "and reuses it throughout"
        );
    }

    #[tokio::test]
    async fn streaming_bodies_go_chunked_and_their_errors_are_the_requests() {
        let (authority, seen, _) =
            upstream(vec!["HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]).await;
        let pool = pool();
        let frames = futures_util::stream::iter([
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"0123456789abcdef!"))),
        ]);
        let response = pool
            .send(
                &authority,
                request(Method::PUT, StreamBody::new(frames).boxed()),
                None,
                Instant::now(),
            )
            .await
            .unwrap()
            .0;
        assert_eq!(text(response).await, "");
        assert_eq!(
            seen.lock().unwrap()[0],
            "PUT /p?q=1 HTTP/1.1\r\nhost: up\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n11\r\n0123456789abcdef!\r\n0\r\n\r\n"
        );
        let failing = futures_util::stream::iter([Err::<Frame<Bytes>, BoxError>("broken".into())]);
        let error = pool
            .send(
                &authority,
                request(Method::PUT, StreamBody::new(failing).boxed()),
                None,
                Instant::now(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(error, PoolError::Request(ClientError::RequestBody(_))),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn malformed_or_cut_answers_are_errors() {
        let (authority, _, _) = upstream(vec!["NOT HTTP\r\n\r\n"]).await;
        let error = pool()
            .send(
                &authority,
                request(Method::GET, crate::proxy::empty()),
                None,
                Instant::now(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(error, PoolError::Request(ClientError::Malformed(_))),
            "{error:?}"
        );
        let (authority, _, _) = upstream(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshortCLOSE",
        ])
        .await;
        let response = pool()
            .send(
                &authority,
                request(Method::GET, crate::proxy::empty()),
                None,
                Instant::now(),
            )
            .await
            .unwrap()
            .0;
        assert!(response.into_body().collect().await.is_err());
    }
}
