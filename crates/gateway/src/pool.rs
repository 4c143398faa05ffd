//! A lean HTTP/1.1 connection pool towards upstream instances.
//!
//! hyper-util's legacy client runs every pooled connection in a task of its own: a request
//! is handed to that task over a channel and its response comes back over another, two
//! task wake-ups per request, and all connections sit behind one mutex. Here the task
//! serving the client drives the upstream connection itself: [`Pool::send`] polls the
//! connection while it waits for the response head, and the response body
//! ([`PooledBody`]) polls it while the body streams. When the body has been read to its
//! end the connection goes back to the pool, idle and untouched by any task; a connection
//! taken from the pool is polled once first, so one the upstream closed meanwhile is
//! noticed and dropped, and a request the connection never took is sent on another one.
//!
//! Used for plain HTTP/1.1 requests; upgrades (WebSocket) and h2c go through hyper-util's
//! client, which handles both.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::{Body, BoxError};

type Connection = http1::Connection<TokioIo<TcpStream>, Body>;

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
    Request(#[source] hyper::Error),
}

/// A connection with its request handle.
struct Entry {
    sender: http1::SendRequest<Body>,
    connection: Connection,
}

struct Idle {
    entry: Entry,
    since: Instant,
}

/// Idle keep-alive connections per upstream authority.
pub(crate) struct Pool {
    /// Keyed by the authority's text: `Authority`'s own `Hash` feeds the hasher one
    /// lower-cased byte at a time, a cost paid twice per request here. (Authorities come
    /// from registry records, so their case does not vary.)
    idle: Mutex<HashMap<Box<str>, Vec<Idle>>>,
    max_idle_per_host: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    last_sweep: Mutex<Instant>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

fn noop_poll(connection: &mut Connection) -> Poll<hyper::Result<()>> {
    Pin::new(connection).poll(&mut Context::from_waker(Waker::noop()))
}

impl Pool {
    pub(crate) fn new(
        max_idle_per_host: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Pool {
            idle: Mutex::new(HashMap::new()),
            max_idle_per_host,
            idle_timeout,
            connect_timeout,
            last_sweep: Mutex::new(Instant::now()),
        })
    }

    fn idle(&self) -> MutexGuard<'_, HashMap<Box<str>, Vec<Idle>>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A pooled connection to `authority` that is still open and ready, if any.
    fn checkout(&self, authority: &Authority) -> Option<Entry> {
        loop {
            let idle = self.idle().get_mut(authority.as_str())?.pop()?;
            let mut entry = idle.entry;
            if idle.since.elapsed() > self.idle_timeout || entry.sender.is_closed() {
                continue;
            }
            // An upstream that closed the idle connection shows up here as a finished one.
            if noop_poll(&mut entry.connection).is_ready() || !entry.sender.is_ready() {
                continue;
            }
            return Some(entry);
        }
    }

    fn put(&self, authority: &Authority, entry: Entry) {
        let now = Instant::now();
        {
            let mut idle = self.idle();
            let entry = Idle { entry, since: now };
            match idle.get_mut(authority.as_str()) {
                Some(list) if list.len() < self.max_idle_per_host => list.push(entry),
                Some(_) => {}
                None if self.max_idle_per_host > 0 => {
                    idle.insert(authority.as_str().into(), vec![entry]);
                }
                None => {}
            }
        }
        self.sweep(now);
    }

    /// Every idle timeout, drops the connections idle for longer (of instances no longer
    /// used, too).
    fn sweep(&self, now: Instant) {
        {
            let mut last = self
                .last_sweep
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if now.duration_since(*last) < self.idle_timeout {
                return;
            }
            *last = now;
        }
        let stale: Vec<Idle> = {
            let mut idle = self.idle();
            let mut stale = Vec::new();
            for list in idle.values_mut() {
                let (keep, old): (Vec<Idle>, Vec<Idle>) = list
                    .drain(..)
                    .partition(|i| now.duration_since(i.since) <= self.idle_timeout);
                *list = keep;
                stale.extend(old);
            }
            idle.retain(|_, list| !list.is_empty());
            stale
        };
        drop(stale);
    }

    async fn connect(&self, authority: &Authority) -> Result<Entry, PoolError> {
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
        // One flattened write per request, as on the listening side (see `server`).
        let (sender, connection) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(PoolError::Request)?;
        Ok(Entry { sender, connection })
    }

    /// Sends `request` (origin-form URI, `Host` set) to `authority` on a pooled or new
    /// connection, driving the connection from the calling task.
    pub(crate) async fn send(
        self: &Arc<Self>,
        authority: &Authority,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, PoolError> {
        loop {
            let (mut entry, reused) = match self.checkout(authority) {
                Some(entry) => (entry, true),
                None => (self.connect(authority).await?, false),
            };
            let mut pending = std::pin::pin!(entry.sender.try_send_request(request));
            let mut finished = false;
            let result = std::future::poll_fn(|cx| {
                if let Poll::Ready(result) = pending.as_mut().poll(cx) {
                    return Poll::Ready(result);
                }
                if !finished && Pin::new(&mut entry.connection).poll(cx).is_ready() {
                    // The connection ended; the request's fate is settled now.
                    finished = true;
                    return pending.as_mut().poll(cx);
                }
                Poll::Pending
            })
            .await;
            match result {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let body = PooledBody {
                        finished: finished || body.is_end_stream(),
                        body,
                        entry: (!finished).then_some(entry),
                        authority: authority.clone(),
                        pool: Arc::clone(self),
                    };
                    return Ok(Response::from_parts(parts, body.boxed()));
                }
                Err(mut error) => match error.take_message() {
                    // A pooled connection that never took the request: use another one.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(PoolError::Request(error.into_error())),
                },
            }
        }
    }
}

/// A response body that drives its connection and hands it back to the pool when read to
/// the end (a body dropped before its end closes the connection).
struct PooledBody {
    body: Incoming,
    /// `None` once the connection ended or went back to the pool.
    entry: Option<Entry>,
    /// Whether the body was read to its end.
    finished: bool,
    authority: Authority,
    pool: Arc<Pool>,
}

impl PooledBody {
    fn release(&mut self) {
        let Some(mut entry) = self.entry.take() else {
            return;
        };
        // Let the connection notice the exchange is over and ask for the next request.
        if noop_poll(&mut entry.connection).is_pending() && entry.sender.is_ready() {
            self.pool.put(&self.authority, entry);
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
        if let Some(entry) = &mut this.entry
            && Pin::new(&mut entry.connection).poll(cx).is_ready()
        {
            this.entry = None;
        }
        let frame = match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(frame) => frame,
        };
        match frame {
            None => {
                this.finished = true;
                this.release();
                Poll::Ready(None)
            }
            Some(Ok(frame)) => {
                if this.body.is_end_stream() {
                    this.finished = true;
                    this.release();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.entry = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if self.finished {
            self.release();
        }
    }
}
