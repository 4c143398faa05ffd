//! Finds HTTP/1.1 requests that carry both `Content-Length` and `Transfer-Encoding`.
//!
//! Such a request is the classic request-smuggling vector (RFC 9112 §6.3): two parsers
//! disagree on where its body ends. hyper frames it by `Transfer-Encoding`, drops
//! `Content-Length` before the service sees the request, and closes the connection
//! afterwards, so the gateway itself is never confused — but it cannot tell such a request
//! from a well-formed chunked one, and the issue asks for a 400. hyper exposes no raw
//! header access (its `preserve_header_case` map is private and skips a `Content-Length`
//! that follows `Transfer-Encoding`), so this module watches the bytes below hyper.
//!
//! [`Sniffed`] wraps the accepted stream and, as hyper reads, follows the HTTP/1.1
//! framing of each request on the connection: it parses each request head (with httparse,
//! the parser hyper uses), skips `Content-Length` bodies, walks chunked bodies, and
//! records the position (0, 1, 2, …) of a head carrying both headers in the connection's
//! [`Framing`]. The service counts the requests it is handed (hyper hands HTTP/1.1
//! requests over in order) and answers the marked one with 400.
//!
//! It fails open: on anything it does not follow (an HTTP/2 preface, a protocol upgrade or
//! `CONNECT`, a head hyper would refuse anyway, a malformed chunk) it stops watching that
//! connection and hyper's own handling stands. Cost: one extra httparse pass over each
//! request head; `Content-Length` bodies are skipped without looking at them.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most headers hyper accepts in a request head.
const MAX_HEADERS: usize = 100;
const NONE: u64 = u64::MAX;

/// What the reader found on one connection, shared with the connection's service.
#[derive(Debug)]
pub(crate) struct Framing {
    /// Position of the request whose head had both framing headers, or `NONE`.
    ambiguous: AtomicU64,
    /// Requests handed to the service so far.
    served: AtomicU64,
}

impl Framing {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Framing {
            ambiguous: AtomicU64::new(NONE),
            served: AtomicU64::new(0),
        })
    }

    /// Counts a request handed to the service; true when its head was ambiguous.
    pub(crate) fn next_is_ambiguous(&self) -> bool {
        let position = self.served.fetch_add(1, Ordering::Relaxed);
        self.ambiguous.load(Ordering::Acquire) == position
    }
}

#[derive(Debug)]
enum State {
    /// Reading a request head; holds the bytes of a head split across reads.
    Head(Vec<u8>),
    /// Skipping this many body bytes.
    Body(u64),
    /// Reading a chunk-size line: the size so far, whether an extension started, and
    /// whether any digit was seen.
    ChunkSize { size: u64, ext: bool, digits: bool },
    /// Skipping this many chunk-data bytes.
    ChunkData(u64),
    /// Expecting the CRLF after chunk data.
    ChunkEnd,
    /// Reading trailer lines; the length of the current line.
    Trailers(usize),
    /// Not following this connection any further.
    Off,
}

/// Follows request framing over the bytes read from a connection.
#[derive(Debug)]
struct Tracker {
    state: State,
    heads: u64,
    max_head: usize,
    framing: Arc<Framing>,
}

impl Tracker {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Head(held) => {
                    if held.is_empty() {
                        // Empty lines before a request line are ignored (RFC 9112 §2.2).
                        let skip = bytes
                            .iter()
                            .position(|b| *b != b'\r' && *b != b'\n')
                            .unwrap_or(bytes.len());
                        bytes = &bytes[skip..];
                        if bytes.is_empty() {
                            return;
                        }
                        match self.head(bytes) {
                            Some(used) => bytes = &bytes[used..],
                            None => {
                                if let State::Head(held) = &mut self.state {
                                    held.extend_from_slice(bytes);
                                }
                                return;
                            }
                        }
                    } else {
                        let before = held.len();
                        held.extend_from_slice(bytes);
                        let joined = std::mem::take(held);
                        match self.head(&joined) {
                            Some(used) => bytes = &bytes[used.saturating_sub(before)..],
                            None => {
                                if let State::Head(held) = &mut self.state {
                                    *held = joined;
                                }
                                return;
                            }
                        }
                    }
                }
                State::Body(left) => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkData(left) => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.state = State::ChunkEnd;
                    }
                }
                State::ChunkSize { size, ext, digits } => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    match b {
                        b'\n' if *digits => {
                            self.state = if *size == 0 {
                                State::Trailers(0)
                            } else {
                                State::ChunkData(*size)
                            };
                        }
                        b'\r' => {}
                        _ if *ext => {}
                        b';' | b' ' | b'\t' if *digits => *ext = true,
                        _ => match (b as char).to_digit(16) {
                            Some(digit) if *size < (1 << 59) => {
                                *size = *size * 16 + u64::from(digit);
                                *digits = true;
                            }
                            _ => self.state = State::Off,
                        },
                    }
                }
                State::ChunkEnd => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    match b {
                        b'\r' => {}
                        b'\n' => {
                            self.state = State::ChunkSize {
                                size: 0,
                                ext: false,
                                digits: false,
                            }
                        }
                        _ => self.state = State::Off,
                    }
                }
                State::Trailers(line) => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    match b {
                        b'\n' if *line == 0 => self.state = State::Head(Vec::new()),
                        b'\n' => *line = 0,
                        b'\r' => {}
                        _ => *line += 1,
                    }
                }
            }
        }
    }

    /// Parses a head at the start of `bytes`: `Some(length)` and the next state when
    /// complete, `None` when more bytes are needed (the state is left as is, or `Off`).
    fn head(&mut self, bytes: &[u8]) -> Option<usize> {
        // Uninitialised: zeroing 100 headers would cost more than parsing a short head.
        let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut []);
        let used = match request.parse_with_uninit_headers(bytes, &mut headers) {
            Ok(httparse::Status::Complete(used)) if used <= self.max_head => used,
            Ok(httparse::Status::Partial) if bytes.len() <= self.max_head => return None,
            _ => {
                // Too long, not HTTP/1.x (an HTTP/2 preface), or malformed: hyper decides.
                self.state = State::Off;
                return None;
            }
        };
        let position = self.heads;
        self.heads += 1;
        let mut length = None;
        let mut chunked = None;
        let mut upgrade = request.method == Some("CONNECT");
        for header in request.headers.iter() {
            if header.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(header.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .or(Some(NONE));
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                let last = header.value.rsplit(|b| *b == b',').next().unwrap_or(b"");
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if header.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        self.state = match (length, chunked) {
            (Some(_), Some(_)) => {
                // hyper closes the connection after this request: nothing more to follow.
                self.framing.ambiguous.store(position, Ordering::Release);
                State::Off
            }
            _ if upgrade => State::Off,
            (None, Some(true)) => State::ChunkSize {
                size: 0,
                ext: false,
                digits: false,
            },
            (Some(n), None) if n != NONE => {
                if n == 0 {
                    State::Head(Vec::new())
                } else {
                    State::Body(n)
                }
            }
            (None, None) => State::Head(Vec::new()),
            // Unparsable length or non-chunked coding: hyper answers 400 and closes.
            _ => State::Off,
        };
        Some(used)
    }
}

/// An accepted stream whose reads are followed by a [`Tracker`].
#[derive(Debug)]
pub(crate) struct Sniffed<S> {
    inner: S,
    tracker: Tracker,
}

impl<S> Sniffed<S> {
    pub(crate) fn new(inner: S, framing: Arc<Framing>, max_head: usize) -> Self {
        Sniffed {
            inner,
            tracker: Tracker {
                state: State::Head(Vec::new()),
                heads: 0,
                max_head,
                framing,
            },
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniffed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result
            && !matches!(this.tracker.state, State::Off)
        {
            this.tracker.feed(&buf.filled()[before..]);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniffed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Feeds `input` to a tracker in pieces of `step` bytes (at least 1); returns the position
/// of the request found ambiguous, if any. For tests and the fuzz target.
pub(crate) fn ambiguous_position(input: &[u8], step: usize) -> Option<u64> {
    let framing = Framing::new();
    let mut tracker = Tracker {
        state: State::Head(Vec::new()),
        heads: 0,
        max_head: 64 * 1024,
        framing: framing.clone(),
    };
    for piece in input.chunks(step.max(1)) {
        tracker.feed(piece);
    }
    let at = framing.ambiguous.load(Ordering::Acquire);
    (at != NONE).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ambiguous(input: &[u8], step: usize) -> Option<u64> {
        ambiguous_position(input, step)
    }

    const SMUGGLE: &[u8] =
        b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";

    #[test]
    fn finds_the_ambiguous_request_wherever_it_is() {
        let mut stream = Vec::new();
        stream.extend_from_slice(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n");
        stream.extend_from_slice(
            b"\r\nPOST /b HTTP/1.1\r\nhost: a\r\ncontent-length: 11\r\n\r\nhello world",
        );
        stream.extend_from_slice(
            b"POST /c HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\n\r\n5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n",
        );
        // A body that looks like a smuggled head must not be taken for one.
        let body = b"GET /d HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        stream.extend_from_slice(
            format!(
                "PUT /d HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        stream.extend_from_slice(body);
        stream.extend_from_slice(SMUGGLE);
        for step in [1, 2, 7, 64, stream.len()] {
            assert_eq!(ambiguous(&stream, step), Some(4), "step {step}");
        }
    }

    #[test]
    fn well_framed_streams_are_never_flagged() {
        let clean = b"GET / HTTP/1.1\r\nhost: a\r\n\r\nPOST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 2\r\n\r\nok";
        for step in [1, 3, clean.len()] {
            assert_eq!(ambiguous(clean, step), None, "step {step}");
        }
        // HTTP/2 prior knowledge and upgrades stop the tracker instead of misreading.
        assert_eq!(ambiguous(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 5), None);
        let upgraded = [
            b"GET /ws HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n".as_slice(),
            SMUGGLE,
        ]
        .concat();
        assert_eq!(ambiguous(&upgraded, 9), None);
    }
}
