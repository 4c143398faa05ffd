//! The gateway's own HTTP/1.x server connection, in place of hyper's for ordinary requests.
//!
//! One task per connection reads into a [`BytesMut`], parses each request head with
//! httparse, hands the request to the proxy and writes the answer back, head and body
//! gathered into one `write` whenever the body is already at hand. Request bodies stream:
//! [`RequestBody`] reads the connection itself (through the [`Conn`] shared with the
//! connection loop) while the proxy sends them upstream; a `Content-Length` body that has
//! already arrived whole is handed over as one buffer.
//!
//! Request framing is decided here, so ambiguous requests are found directly: a head with
//! both `Content-Length` and `Transfer-Encoding` (the request-smuggling vector of RFC 9112
//! §6.3) is handed to the proxy marked ambiguous (it answers 400 and forwards nothing) and
//! the connection is closed afterwards. Malformed heads get 400, heads over the limit 431,
//! without reaching the proxy, as hyper did.
//!
//! What this path does not speak goes to hyper with the bytes already read put back in
//! front ([`Handover`]): the HTTP/2 prior-knowledge preface (h2c from clients) and requests
//! asking for a protocol upgrade (`Upgrade`, `CONNECT`).
//!
//! Behaviour kept from hyper's server: leading empty lines are skipped; HTTP/1.1 is kept
//! alive unless `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`;
//! pipelined requests are answered in order; `Expect: 100-continue` gets its interim answer
//! when the body is first read; `HEAD`, 1xx, 204 and 304 answers carry no body; a body of
//! unknown length is sent chunked (close-delimited to HTTP/1.0 clients); a `date` header is
//! added; the header read timeout closes a connection that does not complete a head in
//! time (idle keep-alive connections included). A request body not read to its end closes
//! the connection after the answer. Request trailers are read and dropped.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use trellis_resilience::http::{
    RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET, insert_rate_limit_headers,
};
use trellis_resilience::ratelimit::RateLimitInfo;

use crate::pool::RawHeaders;
use crate::proxy::{Body, REQUEST_ID};

/// Most headers accepted in a request head (as hyper); more is answered 431.
const MAX_HEADERS: usize = 100;
/// The HTTP/2 connection preface a prior-knowledge client starts with.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Bytes asked of the socket per read, at least.
const READ_SIZE: usize = 8 * 1024;
/// Response body frames up to this size are copied behind the head into one write.
const COPY_LIMIT: usize = 16 * 1024;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Why a request head was refused before reaching the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeadError {
    /// Malformed request line, header, length or coding: 400.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// Head longer than the limit, or too many headers: 431.
    #[error("request head too large")]
    TooLarge,
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// The chunked coding is malformed.
    #[error("invalid chunked body: {0}")]
    Chunked(&'static str),
    /// The client closed the connection before the end of the body.
    #[error("connection closed before the end of the body")]
    Incomplete,
    /// Reading the connection failed.
    #[error("reading the request body: {0}")]
    Io(#[from] io::Error),
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) parts: http::request::Parts,
    /// The head's bytes as received.
    pub(crate) raw: Bytes,
    pub(crate) framing: Framing,
    /// Both `Content-Length` and `Transfer-Encoding`: answered 400, then the connection
    /// closes (the body's end is unknown).
    pub(crate) ambiguous: bool,
    /// Whether the client wants the connection kept open after the answer.
    pub(crate) keep_alive: bool,
    pub(crate) expect_continue: bool,
    /// An `Upgrade` header or `CONNECT`: served by hyper.
    pub(crate) upgrade: bool,
    /// Whether any hop-by-hop header is present (see [`is_hop_by_hop`]).
    pub(crate) hop_by_hop: bool,
}

/// What the parser learnt about a request beyond its parts, handed to the service with
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeadInfo {
    /// Both `Content-Length` and `Transfer-Encoding` (see [`Head::ambiguous`]).
    pub(crate) ambiguous: bool,
    /// Whether any hop-by-hop header is present; when not, a proxy has none to strip.
    pub(crate) hop_by_hop: bool,
}

impl HeadInfo {
    /// For a request another server parsed: nothing known, so everything is checked.
    pub(crate) const UNKNOWN: HeadInfo = HeadInfo {
        ambiguous: false,
        hop_by_hop: true,
    };
}

/// What the service answers a request with: a response, and headers written beside its
/// map's without being put into it (each insert into a `HeaderMap` costs hashing and,
/// for a first header, allocating the map).
pub(crate) struct Reply {
    /// Status, the headers the gateway set, and the body.
    pub(crate) response: Response<Body>,
    /// An upstream's headers as received, written after the map's except those of names
    /// the map (or `request_id`) has.
    pub(crate) raw: Option<RawHeaders>,
    /// `X-Request-Id`, in place of any in the map or in `raw`.
    pub(crate) request_id: Option<HeaderValue>,
    /// The `RateLimit-*` triple of a rate-limited route, in place of any of those names
    /// in the map or in `raw` (three numbers written as text: no map, no allocation).
    pub(crate) rate_limit: Option<RateLimitInfo>,
}

impl Reply {
    /// The response with every header in its map, for a writer that knows only the map
    /// (hyper's).
    pub(crate) fn into_response(self) -> Response<Body> {
        let (mut parts, body) = self.response.into_parts();
        if let Some(id) = self.request_id {
            parts.headers.insert(REQUEST_ID, id);
        }
        if let Some(info) = &self.rate_limit {
            insert_rate_limit_headers(&mut parts.headers, info);
        }
        crate::pool::materialize(&mut parts.headers, self.raw);
        Response::from_parts(parts, body)
    }
}

impl From<Response<Body>> for Reply {
    fn from(response: Response<Body>) -> Self {
        Reply {
            response,
            raw: None,
            request_id: None,
            rate_limit: None,
        }
    }
}

/// Whether `name` (any case) is one of the `RateLimit-*` triple [`Reply::rate_limit`]
/// writes.
fn is_rate_limit_name(name: &[u8]) -> bool {
    [RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET]
        .iter()
        .any(|own| own.as_str().as_bytes().eq_ignore_ascii_case(name))
}

/// Whether `name` is a hop-by-hop header (RFC 9110 §7.6.1): it describes one connection
/// and is never forwarded. (Headers that `Connection` names are hop-by-hop too.)
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    is_hop_by_hop_name(name.as_str().as_bytes())
}

/// [`is_hop_by_hop`] for a name as received, in any case (the pool's raw answer heads).
pub(crate) fn is_hop_by_hop_name(name: &[u8]) -> bool {
    const HOP_BY_HOP: [&[u8]; 8] = [
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    HOP_BY_HOP.iter().any(|hop| hop.eq_ignore_ascii_case(name))
}

/// Offsets of one header in the head (name start, name end, value start, value end).
pub(crate) type Indices = (usize, usize, usize, usize);

/// Skips the empty lines allowed before a request line (RFC 9112 §2.2).
fn skip_empty_lines(buf: &mut BytesMut) {
    let skip = buf
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(buf.len());
    if skip > 0 {
        buf.advance(skip);
    }
}

/// Whether `buf` starts like the HTTP/2 preface: `Some(true)` when it holds all of it,
/// `Some(false)` when it holds a part of it only.
fn preface(buf: &[u8]) -> Option<bool> {
    let n = buf.len().min(PREFACE.len());
    (buf[..n] == PREFACE[..n]).then_some(n == PREFACE.len())
}

/// Parses the request head at the start of `buf` (after any empty lines): `Ok(None)` when
/// more bytes are needed. On success the head's bytes are taken out of `buf`.
pub(crate) fn parse_head(
    buf: &mut BytesMut,
    max_head: usize,
    scratch: &mut Vec<Indices>,
) -> Result<Option<Head>, HeadError> {
    skip_empty_lines(buf);
    if buf.is_empty() {
        return Ok(None);
    }
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let used = match request.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(used)) if used <= max_head => used,
        Ok(httparse::Status::Complete(_)) => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) if buf.len() <= max_head => return Ok(None),
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::TooLarge);
        }
        Err(_) => return Err(HeadError::BadRequest("malformed request head")),
    };
    let method = Method::from_bytes(request.method.unwrap_or("").as_bytes())
        .map_err(|_| HeadError::BadRequest("invalid method"))?;
    let path = request
        .path
        .and_then(|path| span(&buf[..used], path.as_bytes()))
        .filter(|(start, end)| start < end)
        .ok_or(HeadError::BadRequest("invalid request target"))?;
    let version = if request.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    header_indices(&buf[..used], request.headers, scratch)
        .ok_or(HeadError::BadRequest("malformed request head"))?;
    let head = buf.split_to(used).freeze();
    let uri = if path.1 - path.0 == 1 && head[path.0] == b'/' {
        Uri::from_static("/")
    } else {
        Uri::from_maybe_shared(head.slice(path.0..path.1))
            .map_err(|_| HeadError::BadRequest("invalid request target"))?
    };
    // Room for the trace headers a sampled request gets (the tracer reserves 4), so that
    // the map does not grow. (The forwarding headers are written by the upstream pool,
    // not put into the map; a map of up to 6 entries stays under 1 KiB, where the
    // allocator's fast path ends.)
    let mut map = HeaderMap::with_capacity(scratch.len() + 4);
    let mut length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut expect_continue = false;
    let mut upgrade = method == Method::CONNECT;
    let mut hop_by_hop = false;
    for &(ns, ne, vs, ve) in scratch.iter() {
        let name = HeaderName::from_bytes(&head[ns..ne])
            .map_err(|_| HeadError::BadRequest("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| HeadError::BadRequest("invalid header value"))?;
        if name == header::CONTENT_LENGTH {
            for part in value.as_bytes().split(|b| *b == b',') {
                let n = parse_length(part.trim_ascii())
                    .ok_or(HeadError::BadRequest("invalid Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::BadRequest("conflicting Content-Length"));
                }
                length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            // Chunked must be the last coding applied (RFC 9112 §6.3).
            let last = value
                .as_bytes()
                .rsplit(|b| *b == b',')
                .next()
                .unwrap_or(b"");
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive_token = true;
                }
            }
        } else if name == header::EXPECT {
            expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        } else if name == header::UPGRADE {
            upgrade = true;
        }
        hop_by_hop |= is_hop_by_hop(&name);
        map.append(name, value);
    }
    let mut ambiguous = false;
    let framing = if transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(HeadError::BadRequest(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if length.is_some() {
            ambiguous = true;
            Framing::None
        } else if chunked {
            Framing::Chunked
        } else {
            return Err(HeadError::BadRequest("unsupported Transfer-Encoding"));
        }
    } else {
        match length {
            Some(0) | None => Framing::None,
            Some(n) => Framing::Length(n),
        }
    };
    let keep_alive = !ambiguous && !close && (version == Version::HTTP_11 || keep_alive_token);
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = map;
    Ok(Some(Head {
        parts: request.into_parts().0,
        raw: head,
        framing,
        ambiguous,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11,
        upgrade,
        hop_by_hop,
    }))
}

/// Where each header's name and value (slices httparse returned) lie in `head`, replacing
/// what `into` held; `None` when one does not lie in it.
pub(crate) fn header_indices(
    head: &[u8],
    headers: &[httparse::Header<'_>],
    into: &mut Vec<Indices>,
) -> Option<()> {
    into.clear();
    for h in headers {
        let name = span(head, h.name.as_bytes())?;
        let value = span(head, h.value)?;
        into.push((name.0, name.1, value.0, value.1));
    }
    Some(())
}

/// Where `part` (a slice the parser returned) lies in `buf`: start and end offsets.
pub(crate) fn span(buf: &[u8], part: &[u8]) -> Option<(usize, usize)> {
    if part.is_empty() {
        return Some((0, 0));
    }
    let start = (part.as_ptr() as usize).checked_sub(buf.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= buf.len()).then_some((start, end))
}

/// An answer's `Content-Length` as the pool reads it from an upstream and the server
/// writes it (surrounding blanks allowed); `None` when it is not digits only.
pub(crate) fn answer_length(value: &[u8]) -> Option<u64> {
    parse_length(value.trim_ascii())
}

/// Digits only, no sign, no overflow.
fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of chunk data left.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// Reading trailer lines; bytes of trailers read so far.
    Trailers(usize),
}

/// The state of the current request's body on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decoder {
    /// This many bytes left.
    Length(u64),
    Chunked(Chunked),
    /// Read to its end.
    Done,
    /// Malformed or cut short: the connection cannot be reused.
    Failed,
}

/// What one decoding step found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Data(Bytes),
    End,
    NeedMore,
}

impl Decoder {
    pub(crate) fn new(framing: Framing) -> Self {
        match framing {
            Framing::None => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::Chunked(Chunked::Size),
        }
    }

    /// Decodes what `buf` holds: body data (taken out of `buf`), the end of the body, or
    /// the need for more bytes.
    pub(crate) fn decode(
        &mut self,
        buf: &mut BytesMut,
        max_trailers: usize,
    ) -> Result<Decoded, BodyError> {
        let decoded = self.step(buf, max_trailers);
        if decoded.is_err() {
            *self = Decoder::Failed;
        }
        decoded
    }

    fn step(&mut self, buf: &mut BytesMut, max_trailers: usize) -> Result<Decoded, BodyError> {
        loop {
            match self {
                Decoder::Done => return Ok(Decoded::End),
                Decoder::Failed => return Err(BodyError::Chunked("body already failed")),
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    *left -= n as u64;
                    if *left == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                Decoder::Chunked(state) => match *state {
                    Chunked::Size => {
                        let Some(line) = line(buf, MAX_CHUNK_LINE)? else {
                            return Ok(Decoded::NeedMore);
                        };
                        let size = chunk_size(&buf[..line])
                            .ok_or(BodyError::Chunked("invalid chunk size line"))?;
                        buf.advance(line + 2);
                        *state = if size == 0 {
                            Chunked::Trailers(0)
                        } else {
                            Chunked::Data(size)
                        };
                    }
                    Chunked::Data(left) => {
                        if buf.is_empty() {
                            return Ok(Decoded::NeedMore);
                        }
                        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                        let left = left - n as u64;
                        *state = if left == 0 {
                            Chunked::DataEnd
                        } else {
                            Chunked::Data(left)
                        };
                        return Ok(Decoded::Data(buf.split_to(n).freeze()));
                    }
                    Chunked::DataEnd => {
                        if buf.len() < 2 {
                            if buf.first().is_some_and(|b| *b != b'\r') {
                                return Err(BodyError::Chunked("no CRLF after chunk data"));
                            }
                            return Ok(Decoded::NeedMore);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(BodyError::Chunked("no CRLF after chunk data"));
                        }
                        buf.advance(2);
                        *state = Chunked::Size;
                    }
                    Chunked::Trailers(read) => {
                        let room = max_trailers.saturating_sub(read);
                        let Some(line) = line(buf, room)? else {
                            return Ok(Decoded::NeedMore);
                        };
                        buf.advance(line + 2);
                        if line == 0 {
                            *self = Decoder::Done;
                            return Ok(Decoded::End);
                        }
                        *state = Chunked::Trailers(read + line + 2);
                    }
                },
            }
        }
    }
}

/// The length of the CRLF-terminated line at the start of `buf` (without the CRLF), `None`
/// when incomplete; an error for a bare LF or a line longer than `max`.
fn line(buf: &[u8], max: usize) -> Result<Option<usize>, BodyError> {
    let window = &buf[..buf.len().min(max.saturating_add(2))];
    match window.iter().position(|b| *b == b'\n') {
        Some(0) => Err(BodyError::Chunked("bare LF")),
        Some(lf) if buf[lf - 1] == b'\r' => Ok(Some(lf - 1)),
        Some(_) => Err(BodyError::Chunked("bare LF")),
        None if window.len() < buf.len() || buf.len() > max.saturating_add(1) => {
            Err(BodyError::Chunked("line too long"))
        }
        None => Ok(None),
    }
}

/// A chunk-size line: hex digits, then optional whitespace and `;` extensions.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 15 {
        return None;
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') || rest.contains(&b'\r') {
        return None;
    }
    line[..digits].iter().try_fold(0u64, |n, d| {
        let v = (*d as char).to_digit(16)?;
        Some(n * 16 + u64::from(v))
    })
}

/// Read side of a connection, shared by the connection loop and the current request body.
#[derive(Debug)]
struct Reader {
    buf: BytesMut,
    decoder: Decoder,
    /// Which request the decoder belongs to; a body of an earlier one reads nothing.
    seq: u64,
    /// `100 Continue` bytes still to write before the body is read (0 = none).
    continue_left: usize,
    /// The answer's head was written: no interim answer any more.
    answered: bool,
    eof: bool,
    max_trailers: usize,
}

/// A connection: the socket (used through `&self`) and its read side.
#[derive(Debug)]
pub(crate) struct Conn {
    io: TcpStream,
    reader: Mutex<Reader>,
}

impl Conn {
    fn reader(&self) -> MutexGuard<'_, Reader> {
        self.reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads what the socket has into `reader.buf`: `Ready(Ok(0))` at end of stream.
    fn poll_fill(&self, reader: &mut Reader, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            match self.try_fill(reader) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.io.poll_read_ready(cx))?;
                }
                result => return Poll::Ready(result),
            }
        }
    }

    /// Reads what the socket has into `reader.buf`, without waiting: `WouldBlock` when
    /// there is nothing yet, `Ok(0)` at end of stream.
    fn try_fill(&self, reader: &mut Reader) -> io::Result<usize> {
        if reader.buf.capacity() - reader.buf.len() < READ_SIZE / 2 {
            reader.buf.reserve(READ_SIZE);
        }
        let n = read_buf(&self.io, &mut reader.buf)?;
        if n == 0 {
            reader.eof = true;
        }
        Ok(n)
    }

    fn poll_body(
        &self,
        cx: &mut Context<'_>,
        seq: u64,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut guard = self.reader();
        let reader = &mut *guard;
        if reader.seq != seq {
            return Poll::Ready(None);
        }
        while reader.continue_left > 0 {
            if reader.answered {
                reader.continue_left = 0;
                break;
            }
            let from = CONTINUE.len() - reader.continue_left;
            match self.io.try_write(&CONTINUE[from..]) {
                Ok(n) => reader.continue_left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = ready!(self.io.poll_write_ready(cx)) {
                        reader.decoder = Decoder::Failed;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                }
                Err(e) => {
                    reader.decoder = Decoder::Failed;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
        loop {
            match reader.decoder.decode(&mut reader.buf, reader.max_trailers) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Decoded::End) => return Poll::Ready(None),
                Ok(Decoded::NeedMore) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            if reader.eof {
                reader.decoder = Decoder::Failed;
                return Poll::Ready(Some(Err(BodyError::Incomplete)));
            }
            if let Err(e) = ready!(self.poll_fill(reader, cx)) {
                reader.decoder = Decoder::Failed;
                return Poll::Ready(Some(Err(e.into())));
            }
        }
    }

    /// Writes all of `bytes`.
    async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.io.try_write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.io.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Reads what `io` has into `buf`, like `try_read_buf`; but a read that does not fill the
/// space offered also clears the socket's read readiness (as tokio's own `poll_read`
/// does), so the next read waits for the reactor instead of costing a failed `recvfrom`.
pub(crate) fn read_buf(io: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let spare = buf.capacity() - buf.len();
    let mut drained = None;
    let read = io.try_io(tokio::io::Interest::READABLE, || {
        let n = io.try_read_buf(buf)?;
        if n > 0 && n < spare {
            drained = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (read, drained) {
        (_, Some(n)) => Ok(n),
        (read, None) => read,
    }
}

/// The body of a request read by this module.
#[derive(Debug)]
pub(crate) struct RequestBody {
    kind: BodyKind,
}

#[derive(Debug)]
enum BodyKind {
    Empty,
    /// Arrived whole with its head.
    Full(Option<Bytes>),
    /// Read from the connection as it is polled.
    Stream {
        conn: Arc<Conn>,
        seq: u64,
        length: Option<u64>,
    },
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.kind {
            BodyKind::Empty => Poll::Ready(None),
            BodyKind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            BodyKind::Stream { conn, seq, .. } => {
                let polled = conn.poll_body(cx, *seq);
                if let Poll::Ready(None) = polled {
                    self.kind = BodyKind::Empty;
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Empty => true,
            BodyKind::Full(data) => data.is_none(),
            BodyKind::Stream { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Empty => SizeHint::with_exact(0),
            BodyKind::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            BodyKind::Stream {
                length: Some(n), ..
            } => SizeHint::with_exact(*n),
            BodyKind::Stream { .. } => SizeHint::default(),
        }
    }
}

/// Limits of one connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    pub(crate) max_head: usize,
    pub(crate) header_read_timeout: Duration,
}

/// How a connection ended.
#[derive(Debug)]
pub(crate) enum Served {
    /// Closed (by either side, after an error or at shutdown).
    Closed,
    /// Something this module does not serve: the rest of the connection is hyper's.
    Handover(Handover),
}

/// What waiting for the next request head found.
// Boxing the head would cost an allocation per request; `Next` only lives on the stack.
#[allow(clippy::large_enum_variant)]
enum Next {
    Head(Head),
    Refuse(HeadError),
    /// To hyper, with this head in front of the buffered bytes.
    Handover(Option<Bytes>),
    Close,
}

/// Serves HTTP/1.x requests on `stream` with `service` (which gets each request and
/// what the parser learnt about it, see [`HeadInfo`]) until the connection closes,
/// `shutdown` changes (after the request in flight), or hyper has to take over.
pub(crate) async fn serve<S, F>(
    stream: TcpStream,
    limits: ConnLimits,
    mut service: S,
    shutdown: watch::Receiver<bool>,
) -> Served
where
    S: FnMut(Request<RequestBody>, HeadInfo) -> F,
    F: Future<Output = Reply>,
{
    let conn = Arc::new(Conn {
        io: stream,
        reader: Mutex::new(Reader {
            buf: BytesMut::with_capacity(READ_SIZE),
            decoder: Decoder::Done,
            seq: 0,
            continue_left: 0,
            answered: false,
            eof: false,
            max_trailers: limits.max_head,
        }),
    });
    let mut scratch = Vec::with_capacity(16);
    let mut out = Vec::with_capacity(READ_SIZE);
    let mut first = true;
    // One wait for shutdown per connection, registered on its first poll and kept: a
    // `changed()` per request would add and remove a waiter under a lock every time.
    let mut watcher = shutdown.clone();
    let mut waits = Waits {
        timer: std::pin::pin!(tokio::time::sleep(limits.header_read_timeout)),
        timer_polled: false,
        stop: std::pin::pin!(watcher.changed()),
        stop_polled: false,
    };
    loop {
        if shutdown.has_changed().unwrap_or(true) {
            break;
        }
        let next = next_head(&conn, limits, &mut scratch, first, &mut waits, &shutdown).await;
        first = false;
        let head = match next {
            Next::Head(head) => head,
            Next::Refuse(error) => {
                let status = match error {
                    HeadError::BadRequest(_) => "400 Bad Request",
                    HeadError::TooLarge => "431 Request Header Fields Too Large",
                };
                tracing::debug!(%error, "request head refused");
                out.clear();
                out.extend_from_slice(b"HTTP/1.1 ");
                out.extend_from_slice(status.as_bytes());
                out.extend_from_slice(b"\r\ncontent-length: 0\r\nconnection: close\r\n");
                push_date(&mut out);
                out.extend_from_slice(b"\r\n");
                let _ = conn.write_all(&out).await;
                break;
            }
            Next::Handover(head) => {
                let rest = std::mem::take(&mut conn.reader().buf);
                let prefix = match head {
                    Some(head) => [&head[..], &rest[..]].concat().into(),
                    None => rest.freeze(),
                };
                return Served::Handover(Handover { conn, prefix });
            }
            Next::Close => break,
        };
        let Head {
            parts,
            framing,
            ambiguous,
            keep_alive,
            expect_continue,
            hop_by_hop,
            ..
        } = head;
        let head_request = parts.method == Method::HEAD;
        let version = parts.version;
        let body = {
            let mut reader = conn.reader();
            reader.seq += 1;
            reader.answered = false;
            reader.continue_left = 0;
            match framing {
                Framing::None => {
                    reader.decoder = Decoder::Done;
                    RequestBody {
                        kind: BodyKind::Empty,
                    }
                }
                Framing::Length(n) if reader.buf.len() as u64 >= n => {
                    reader.decoder = Decoder::Done;
                    let data = reader.buf.split_to(n as usize).freeze();
                    RequestBody {
                        kind: BodyKind::Full(Some(data)),
                    }
                }
                _ => {
                    reader.decoder = Decoder::new(framing);
                    if expect_continue && reader.buf.is_empty() {
                        reader.continue_left = CONTINUE.len();
                    }
                    RequestBody {
                        kind: BodyKind::Stream {
                            conn: conn.clone(),
                            seq: reader.seq,
                            length: match framing {
                                Framing::Length(n) => Some(n),
                                _ => None,
                            },
                        },
                    }
                }
            }
        };
        let request = Request::from_parts(parts, body);
        let info = HeadInfo {
            ambiguous,
            hop_by_hop,
        };
        let reply = service(request, info).await;
        let body_done = {
            let mut reader = conn.reader();
            reader.answered = true;
            reader.decoder == Decoder::Done
        };
        let keep_alive = keep_alive && body_done && !shutdown.has_changed().unwrap_or(true);
        match write_response(&conn, &mut out, reply, head_request, version, keep_alive).await {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
        // The body may have been dropped unread while the answer streamed.
        if conn.reader().decoder != Decoder::Done {
            break;
        }
    }
    close(conn).await;
    Served::Closed
}

/// Shuts the write side down when no body holds the connection any more.
async fn close(mut conn: Arc<Conn>) {
    if let Some(conn) = Arc::get_mut(&mut conn) {
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut conn.io).await;
    }
}

/// What a connection waits on besides its socket while it waits for a head: the header
/// read timer and shutdown. Each keeps the task's waker from its first poll; after that a
/// wait only looks whether the timer fired or the watch changed, instead of polling them
/// again, which would store the waker anew for every request.
struct Waits<'a, F> {
    timer: Pin<&'a mut tokio::time::Sleep>,
    /// Whether `timer` holds the task's waker (polled since it was last set).
    timer_polled: bool,
    stop: Pin<&'a mut F>,
    stop_polled: bool,
}

/// Why a wait for a head ended.
enum Woke {
    Readable,
    Timer,
    Stop,
}

impl<F: Future<Output = Result<(), watch::error::RecvError>>> Waits<'_, F> {
    /// `Ready` when the timer fired or shutdown began (`shutdown` being the receiver
    /// whose change `stop` waits for); `Pending` with the task's waker kept by both.
    fn poll_fired(&mut self, cx: &mut Context<'_>, shutdown: &watch::Receiver<bool>) -> Poll<Woke> {
        if !self.timer_polled {
            if self.timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Woke::Timer);
            }
            self.timer_polled = true;
        } else if self.timer.is_elapsed() {
            return Poll::Ready(Woke::Timer);
        }
        if !self.stop_polled {
            if self.stop.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Woke::Stop);
            }
            self.stop_polled = true;
        } else if shutdown.has_changed().unwrap_or(true) {
            return Poll::Ready(Woke::Stop);
        }
        Poll::Pending
    }

    /// Sets the timer to `at`; it takes the task's waker at the next wait.
    fn set_timer(&mut self, at: tokio::time::Instant) {
        self.timer.as_mut().reset(at);
        self.timer_polled = false;
    }
}

async fn next_head<F: Future<Output = Result<(), watch::error::RecvError>>>(
    conn: &Conn,
    limits: ConnLimits,
    scratch: &mut Vec<Indices>,
    first: bool,
    waits: &mut Waits<'_, F>,
    shutdown: &watch::Receiver<bool>,
) -> Next {
    // When this wait for a head times out.
    let mut due = None;
    loop {
        {
            let mut guard = conn.reader();
            let reader = &mut *guard;
            let h2 = if first {
                skip_empty_lines(&mut reader.buf);
                preface(&reader.buf)
            } else {
                None
            };
            match h2 {
                Some(true) => return Next::Handover(None),
                Some(false) if !reader.buf.is_empty() => {}
                _ => match parse_head(&mut reader.buf, limits.max_head, scratch) {
                    Ok(Some(head)) if head.upgrade && !head.ambiguous => {
                        // hyper serves it: the head goes back in front of what follows.
                        return Next::Handover(Some(head.raw));
                    }
                    Ok(Some(head)) => return Next::Head(head),
                    Ok(None) => {}
                    Err(e) => return Next::Refuse(e),
                },
            }
            if reader.eof {
                return Next::Close;
            }
            // Nothing yet: the wait below registers for the socket's readiness.
            match conn.try_fill(reader) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Next::Close,
            }
        }
        if due.is_none() {
            let at = tokio::time::Instant::now() + limits.header_read_timeout;
            due = Some(at);
            // The connection's one timer moves only when it would fire late. Still set
            // for an earlier wait, it fires early and is moved then (below): a busy
            // connection re-registers it in the timer wheel about once per timeout, not
            // once per request.
            if waits.timer.deadline() > at {
                waits.set_timer(at);
            }
        }
        let woke = std::future::poll_fn(|cx| match conn.io.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Woke::Readable),
            Poll::Ready(Err(_)) => Poll::Ready(Woke::Stop),
            Poll::Pending => waits.poll_fired(cx, shutdown),
        })
        .await;
        match woke {
            Woke::Readable => {}
            Woke::Timer => {
                if let Some(at) = due
                    && tokio::time::Instant::now() < at
                {
                    waits.set_timer(at);
                    continue;
                }
                tracing::debug!("header read timeout");
                return Next::Close;
            }
            // Done once: the connection closes and it is not polled again.
            Woke::Stop => return Next::Close,
        }
    }
}

/// Writes the answer; `Ok(true)` when the connection stays open.
async fn write_response(
    conn: &Conn,
    out: &mut Vec<u8>,
    reply: Reply,
    head_request: bool,
    version: Version,
    mut keep_alive: bool,
) -> io::Result<bool> {
    let Reply {
        response,
        raw,
        request_id,
        rate_limit,
    } = reply;
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut length = None;
    let mut has_length = false;
    let mut has_date = false;
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH {
            has_length = true;
            length = answer_length(value.as_bytes());
        } else if *name == header::TRANSFER_ENCODING || *name == header::CONNECTION {
            // Framing and connection handling are this module's.
            continue;
        } else if *name == header::DATE {
            has_date = true;
        } else if (request_id.is_some() && *name == REQUEST_ID)
            || (rate_limit.is_some() && is_rate_limit_name(name.as_str().as_bytes()))
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(id) = &request_id {
        out.extend_from_slice(REQUEST_ID.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(info) = &rate_limit {
        let mut digits = [0u8; 20];
        for (name, n) in [
            (RATELIMIT_LIMIT, u64::from(info.limit)),
            (RATELIMIT_REMAINING, u64::from(info.remaining)),
            (RATELIMIT_RESET, info.reset_secs()),
        ] {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(itoa(n, &mut digits));
            out.extend_from_slice(b"\r\n");
        }
    }
    // An upstream's headers as received, after those of the map (which win).
    if let Some(raw) = &raw {
        for (name, value) in raw.iter() {
            if parts
                .headers
                .keys()
                .any(|own| own.as_str().as_bytes().eq_ignore_ascii_case(name))
                || (request_id.is_some()
                    && name.eq_ignore_ascii_case(REQUEST_ID.as_str().as_bytes()))
                || (rate_limit.is_some() && is_rate_limit_name(name))
            {
                continue;
            }
            if name.eq_ignore_ascii_case(b"content-length") {
                has_length = true;
                length = answer_length(value);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"connection")
            {
                continue;
            } else if name.eq_ignore_ascii_case(b"date") {
                has_date = true;
            }
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }
    enum Encoding {
        None,
        Length(u64),
        Chunked,
        Close,
    }
    let encoding = if no_body {
        // A HEAD answer tells the length a GET would have had, when known.
        if head_request
            && !has_length
            && let Some(n) = body.size_hint().exact()
        {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n, &mut [0u8; 20]));
            out.extend_from_slice(b"\r\n");
        }
        Encoding::None
    } else if has_length {
        match length {
            Some(n) => Encoding::Length(n),
            None => {
                keep_alive = false;
                Encoding::Close
            }
        }
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa(n, &mut [0u8; 20]));
        out.extend_from_slice(b"\r\n");
        Encoding::Length(n)
    } else if version == Version::HTTP_11 {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Encoding::Chunked
    } else {
        keep_alive = false;
        Encoding::Close
    };
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !has_date {
        push_date(out);
    }
    out.extend_from_slice(b"\r\n");
    let mut left = match encoding {
        Encoding::None => {
            conn.write_all(out).await?;
            return Ok(keep_alive);
        }
        Encoding::Length(n) => n,
        _ => u64::MAX,
    };
    let chunked = matches!(encoding, Encoding::Chunked);
    loop {
        // Frames already at hand go behind what is buffered; the rest waits for the next.
        let pending_out = !out.is_empty();
        let polled = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Pending if pending_out => Poll::Ready(None::<Option<_>>),
            Poll::Pending => Poll::Pending,
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
        })
        .await;
        let frame = match polled {
            Some(frame) => frame,
            None => {
                conn.write_all(out).await?;
                out.clear();
                continue;
            }
        };
        match frame {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body failed");
                conn.write_all(out).await?;
                return Ok(false);
            }
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                if !chunked {
                    if data.len() as u64 > left {
                        // More than announced: cut, and close.
                        data.truncate(usize::try_from(left).unwrap_or(usize::MAX));
                        keep_alive = false;
                    }
                    left -= data.len() as u64;
                }
                if chunked {
                    out.extend_from_slice(format_hex(data.len(), &mut [0u8; 16]));
                    out.extend_from_slice(b"\r\n");
                }
                if data.len() <= COPY_LIMIT {
                    out.extend_from_slice(&data);
                } else {
                    conn.write_all(out).await?;
                    out.clear();
                    conn.write_all(&data).await?;
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
                if !chunked && left == 0 {
                    break;
                }
            }
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    } else if left != 0 && left != u64::MAX {
        // Shorter than announced: the client can only tell from the connection closing.
        keep_alive = false;
    }
    if !out.is_empty() {
        conn.write_all(out).await?;
        out.clear();
    }
    Ok(keep_alive)
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

fn format_hex(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 || i == 0 {
            return &buf[i..];
        }
    }
}

/// Appends `date: …\r\n`, the text made once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second || date.1.is_empty() {
            *date = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// A connection handed to hyper: the bytes already read come first.
#[derive(Debug)]
pub(crate) struct Handover {
    conn: Arc<Conn>,
    prefix: Bytes,
}

impl AsyncRead for Handover {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        loop {
            match this.conn.io.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(this.conn.io.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Handover {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.conn.io.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.conn.io.poll_write_ready(cx))?;
                }
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Arc::get_mut(&mut self.get_mut().conn) {
            Some(conn) => Pin::new(&mut conn.io).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Follows the request framing of `input` fed in pieces of `step` bytes, as the
/// connection loop does (bodies skipped, chunked bodies decoded); returns the position of
/// the first request with both `Content-Length` and `Transfer-Encoding`. Stops at
/// anything the loop would refuse or hand to hyper. For tests and the fuzz target.
pub(crate) fn ambiguous_position(input: &[u8], step: usize) -> Option<u64> {
    let mut buf = BytesMut::new();
    let mut scratch = Vec::new();
    let mut decoder = None::<Decoder>;
    let mut position = 0u64;
    for piece in input.chunks(step.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            if let Some(d) = &mut decoder {
                match d.decode(&mut buf, 64 * 1024) {
                    Ok(Decoded::Data(_)) => continue,
                    Ok(Decoded::End) => decoder = None,
                    Ok(Decoded::NeedMore) => break,
                    Err(_) => return None,
                }
            }
            if position == 0 {
                skip_empty_lines(&mut buf);
                match preface(&buf) {
                    Some(true) => return None,
                    Some(false) if !buf.is_empty() => break,
                    _ => {}
                }
            }
            match parse_head(&mut buf, 64 * 1024, &mut scratch) {
                Ok(Some(head)) if head.ambiguous => return Some(position),
                Ok(Some(head)) if head.upgrade || !head.keep_alive => return None,
                Ok(Some(head)) => {
                    position += 1;
                    decoder = Some(Decoder::new(head.framing));
                }
                Ok(None) => break,
                Err(_) => return None,
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Option<Head>, HeadError> {
        parse_head(&mut BytesMut::from(bytes), 1024, &mut Vec::new())
    }

    #[test]
    fn heads_parse_at_every_split() {
        let head = b"\r\nPOST /a/b?c=d HTTP/1.1\r\nHost: x\r\ncontent-length: 5\r\nX-Two: 1\r\nx-two: 2\r\n\r\nhello";
        for split in 0..head.len() {
            let mut buf = BytesMut::from(&head[..split]);
            let mut scratch = Vec::new();
            let first = parse_head(&mut buf, 1024, &mut scratch).unwrap();
            let parsed = match first {
                Some(parsed) => {
                    buf.extend_from_slice(&head[split..]);
                    parsed
                }
                None => {
                    buf.extend_from_slice(&head[split..]);
                    parse_head(&mut buf, 1024, &mut scratch).unwrap().unwrap()
                }
            };
            assert_eq!(parsed.parts.method, Method::POST);
            assert_eq!(parsed.parts.uri, "/a/b?c=d");
            assert_eq!(parsed.parts.headers["host"], "x");
            assert_eq!(parsed.parts.headers.get_all("x-two").iter().count(), 2);
            assert_eq!(parsed.framing, Framing::Length(5));
            assert!(parsed.keep_alive);
            assert_eq!(&buf[..], b"hello");
        }
    }

    #[test]
    fn malformed_heads_and_limits() {
        assert_eq!(
            parse(b"GARBAGE\r\n\r\n").unwrap_err(),
            HeadError::BadRequest("malformed request head")
        );
        assert!(matches!(
            parse(b"GET / HTTP/9.9\r\n\r\n"),
            Err(HeadError::BadRequest(_))
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"),
            Err(HeadError::BadRequest(_))
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\ncontent-length: +1\r\n\r\n"),
            Err(HeadError::BadRequest(_))
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n"),
            Err(HeadError::BadRequest(_))
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n"),
            Err(HeadError::BadRequest(_))
        ));
        let same = parse(b"POST / HTTP/1.1\r\ncontent-length: 3, 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(same.framing, Framing::Length(3));
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(2000));
        assert_eq!(parse(big.as_bytes()).unwrap_err(), HeadError::TooLarge);
        assert_eq!(
            parse(&big.as_bytes()[..1500]).unwrap_err(),
            HeadError::TooLarge
        );
        let many: String = (0..101).map(|i| format!("h{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            parse_head(
                &mut BytesMut::from(many.as_bytes()),
                64 * 1024,
                &mut Vec::new()
            )
            .unwrap_err(),
            HeadError::TooLarge
        );
    }

    #[test]
    fn answer_lengths_are_digits_between_blanks() {
        assert_eq!(answer_length(b"20"), Some(20));
        assert_eq!(answer_length(b" \t20 "), Some(20));
        assert_eq!(answer_length(b"0"), Some(0));
        for bad in [
            &b""[..],
            b" ",
            b"+20",
            b"-1",
            b"2 0",
            b"0x10",
            b"20;",
            b"99999999999999999999",
        ] {
            assert_eq!(
                answer_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn framing_keep_alive_and_upgrades() {
        // Which heads carry a hop-by-hop header (a proxy strips those only then).
        for (head, hop_by_hop) in [
            (
                &b"GET / HTTP/1.1\r\nhost: a\r\nx-keep: 1\r\n\r\n"[..],
                false,
            ),
            (b"GET / HTTP/1.1\r\nkeep-alive: 5\r\n\r\n", true),
            (b"GET / HTTP/1.1\r\nTE: trailers\r\n\r\n", true),
            (b"GET / HTTP/1.1\r\nproxy-authorization: x\r\n\r\n", true),
            (b"GET / HTTP/1.1\r\nConnection: x-a\r\nx-a: 1\r\n\r\n", true),
            (
                b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
                true,
            ),
        ] {
            let parsed = parse(head).unwrap().unwrap();
            assert_eq!(
                parsed.hop_by_hop,
                hop_by_hop,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        let both =
            parse(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(both.ambiguous && !both.keep_alive);
        let chunked = parse(b"POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(chunked.framing, Framing::Chunked);
        assert!(
            !parse(b"GET / HTTP/1.0\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
        assert!(
            parse(b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
        assert!(
            !parse(b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
        assert!(
            parse(b"GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
                .unwrap()
                .unwrap()
                .upgrade
        );
        assert!(
            parse(b"CONNECT a:1 HTTP/1.1\r\n\r\n")
                .unwrap()
                .unwrap()
                .upgrade
        );
        assert!(
            parse(b"POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n")
                .unwrap()
                .unwrap()
                .expect_continue
        );
        assert_eq!(preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nxyz"), Some(true));
        assert_eq!(preface(b"PRI * HT"), Some(false));
        assert_eq!(preface(b"POST"), None);
    }

    fn decode_all(body: &[u8], step: usize) -> Result<(Vec<u8>, usize), BodyError> {
        let mut decoder = Decoder::new(Framing::Chunked);
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        for piece in body.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match decoder.decode(&mut buf, 1024)? {
                    Decoded::Data(d) => data.extend_from_slice(&d),
                    Decoded::End => return Ok((data, buf.len())),
                    Decoded::NeedMore => break,
                }
            }
        }
        Err(BodyError::Incomplete)
    }

    #[test]
    fn chunked_bodies_with_extensions_and_trailers_at_every_split() {
        let body = b"5;name=value\r\nhello\r\nA \t; x\r\n0123456789\r\n0\r\nx-trailer: 1\r\nx-other: 2\r\n\r\nGET";
        for step in 1..=body.len() {
            let (data, rest) = decode_all(body, step).unwrap();
            assert_eq!(data, b"hello0123456789", "step {step}");
            assert!(
                rest <= 3,
                "step {step}: only the next head's bytes are left"
            );
        }
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"\r\n",
            b"1ffffffffffffffff\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
        ] {
            for step in [1, 2, bad.len()] {
                assert!(
                    decode_all(bad, step).is_err(),
                    "{:?} step {step}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert!(decode_all(long.as_bytes(), 7).is_err());
        let trailers = format!("0\r\nx: {}\r\n\r\n", "t".repeat(2000));
        assert!(decode_all(trailers.as_bytes(), 100).is_err());
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
        for step in 1..=stream.len() {
            assert_eq!(ambiguous_position(&stream, step), Some(4), "step {step}");
        }
    }

    #[test]
    fn well_framed_streams_are_never_flagged() {
        let clean = b"GET / HTTP/1.1\r\nhost: a\r\n\r\nPOST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 2\r\n\r\nok";
        for step in [1, 3, clean.len()] {
            assert_eq!(ambiguous_position(clean, step), None, "step {step}");
        }
        assert_eq!(
            ambiguous_position(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 5),
            None
        );
        let upgraded = [
            b"GET /ws HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n".as_slice(),
            SMUGGLE,
        ]
        .concat();
        assert_eq!(ambiguous_position(&upgraded, 9), None);
    }

    mod connection {
        use super::super::*;
        use http_body_util::{BodyExt, Full, StreamBody};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        fn full(text: String) -> Body {
            Full::new(Bytes::from(text))
                .map_err(|never| match never {})
                .boxed()
        }

        /// Answers `METHOD URI ambiguous? body`; `/chunked` streams its answer in two
        /// pieces of unknown length, `/empty` answers 204.
        async fn echo(request: Request<RequestBody>, info: HeadInfo) -> Response<Body> {
            let ambiguous = info.ambiguous;
            let (parts, body) = request.into_parts();
            let body = match body.collect().await {
                Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
                Err(e) => format!("error: {e}"),
            };
            let text = format!("{} {} {ambiguous} {body}", parts.method, parts.uri);
            match parts.uri.path() {
                "/chunked" => {
                    let frames = futures_util::stream::iter([
                        Ok::<_, BoxErr>(Frame::data(Bytes::from("abc"))),
                        Ok(Frame::data(Bytes::from(text))),
                    ]);
                    Response::new(StreamBody::new(frames).boxed())
                }
                "/empty" => {
                    let mut response = Response::new(full(String::new()));
                    *response.status_mut() = StatusCode::NO_CONTENT;
                    response
                }
                _ => Response::new(full(text)),
            }
        }

        type BoxErr = crate::proxy::BoxError;

        async fn server(
            limits: ConnLimits,
        ) -> (
            std::net::SocketAddr,
            watch::Sender<bool>,
            tokio::task::JoinHandle<()>,
        ) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, rx) = watch::channel(false);
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let rx = rx.clone();
                    tokio::spawn(async move {
                        let service =
                            |request, info| async move { Reply::from(echo(request, info).await) };
                        let _ = serve(stream, limits, service, rx).await;
                    });
                }
            });
            (addr, tx, task)
        }

        fn limits() -> ConnLimits {
            ConnLimits {
                max_head: 1024,
                header_read_timeout: Duration::from_secs(5),
            }
        }

        /// Sends `input` (half-closing after it) and reads everything until the server
        /// closes.
        async fn exchange(addr: std::net::SocketAddr, input: &[u8]) -> String {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(input).await.unwrap();
            stream.shutdown().await.unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
                .await
                .unwrap()
                .unwrap();
            String::from_utf8_lossy(&answer).into_owned()
        }

        fn bodies(answer: &str) -> Vec<&str> {
            answer
                .split("HTTP/1.1 ")
                .skip(1)
                .map(|r| r.split("\r\n\r\n").nth(1).unwrap_or(""))
                .collect()
        }

        #[tokio::test]
        async fn pipelined_requests_are_answered_in_order() {
            let (addr, _stop, _task) = server(limits()).await;
            let input = b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n\
                POST /b HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello\
                POST /c HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nt: 1\r\n\r\n\
                HEAD /d HTTP/1.1\r\n\r\n\
                GET /empty HTTP/1.1\r\n\r\n\
                GET /chunked HTTP/1.1\r\n\r\n";
            let expected = [
                "GET /a false ",
                "POST /b false hello",
                "POST /c false abcde",
                "",
                "",
                // (The split at the empty line cuts the last chunk's terminator.)
                "3\r\nabc\r\n13\r\nGET /chunked false \r\n0",
            ];
            let whole = exchange(addr, input).await;
            assert_eq!(bodies(&whole), expected, "{whole}");
            assert!(
                whole.contains("content-length: 14\r\n"),
                "HEAD keeps the length: {whole}"
            );
            assert!(whole.contains("transfer-encoding: chunked\r\n"), "{whole}");
            assert!(whole.contains("date: "), "{whole}");
            // Byte by byte.
            let mut stream = TcpStream::connect(addr).await.unwrap();
            for byte in input {
                stream.write_all(&[*byte]).await.unwrap();
            }
            stream.shutdown().await.unwrap();
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await.unwrap();
            let answer = String::from_utf8_lossy(&answer);
            assert_eq!(bodies(&answer), expected, "{answer}");
        }

        #[tokio::test]
        async fn refusals_close_the_connection() {
            let (addr, _stop, _task) = server(limits()).await;
            let answer = exchange(addr, b"GARBAGE\r\n\r\nGET / HTTP/1.1\r\n\r\n").await;
            assert!(
                answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{answer}"
            );
            assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
            let big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(2000));
            let answer = exchange(addr, big.as_bytes()).await;
            assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
            // Ambiguous framing reaches the service marked, and nothing after it is read.
            let answer = exchange(
                addr,
                b"POST /s HTTP/1.1\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
            )
            .await;
            assert_eq!(bodies(&answer), ["POST /s true "], "{answer}");
            assert!(answer.contains("connection: close\r\n"), "{answer}");
            // A malformed chunked body is an error of the body; the connection closes.
            let answer = exchange(
                addr,
                b"POST /c HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nGET /x HTTP/1.1\r\n\r\n",
            )
            .await;
            assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
            assert!(answer.contains("error: invalid chunked body"), "{answer}");
        }

        #[tokio::test]
        async fn http_1_0_and_connection_close() {
            let (addr, _stop, _task) = server(limits()).await;
            let answer = exchange(addr, b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n\r\n").await;
            assert_eq!(bodies(&answer), ["GET /a false "], "{answer}");
            assert!(answer.contains("connection: close\r\n"), "{answer}");
            let answer = exchange(
                addr,
                b"GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\nconnection: close\r\n\r\nGET /c HTTP/1.1\r\n\r\n",
            )
            .await;
            assert_eq!(
                bodies(&answer),
                ["GET /a false ", "GET /b false "],
                "{answer}"
            );
            assert!(answer.contains("connection: keep-alive\r\n"), "{answer}");
        }

        #[tokio::test]
        async fn expect_continue_gets_its_interim_answer_when_the_body_is_read() {
            let (addr, _stop, _task) = server(limits()).await;
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"PUT /e HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n")
                .await
                .unwrap();
            let mut interim = [0u8; 25];
            stream.read_exact(&mut interim).await.unwrap();
            assert_eq!(&interim, CONTINUE);
            stream.write_all(b"ok").await.unwrap();
            stream.shutdown().await.unwrap();
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await.unwrap();
            let answer = String::from_utf8_lossy(&answer);
            assert_eq!(bodies(&answer), ["PUT /e false ok"], "{answer}");
        }

        #[tokio::test]
        async fn slow_heads_time_out_and_shutdown_closes_idle_connections() {
            let (addr, stop, _task) = server(ConnLimits {
                max_head: 1024,
                header_read_timeout: Duration::from_millis(200),
            })
            .await;
            let mut slow = TcpStream::connect(addr).await.unwrap();
            slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            let mut rest = Vec::new();
            let started = std::time::Instant::now();
            tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest))
                .await
                .unwrap()
                .unwrap();
            assert!(rest.is_empty() && started.elapsed() >= Duration::from_millis(150));

            let mut idle = TcpStream::connect(addr).await.unwrap();
            idle.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            let mut first = vec![0u8; 512];
            let n = idle.read(&mut first).await.unwrap();
            assert!(first[..n].starts_with(b"HTTP/1.1 200 OK"));
            stop.send(true).unwrap();
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(1), idle.read_to_end(&mut rest))
                .await
                .unwrap()
                .unwrap();
            assert!(rest.is_empty());
        }

        /// The timer still set for the first wait fires during the second: the second
        /// wait gets its whole timeout all the same, then the connection closes.
        #[tokio::test]
        async fn each_wait_for_a_head_gets_the_whole_timeout() {
            let (addr, _stop, _task) = server(ConnLimits {
                max_head: 1024,
                header_read_timeout: Duration::from_millis(300),
            })
            .await;
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // The first wait starts now and would end at 300 ms.
            tokio::time::sleep(Duration::from_millis(200)).await;
            stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            let mut first = vec![0u8; 512];
            let n = stream.read(&mut first).await.unwrap();
            assert!(first[..n].starts_with(b"HTTP/1.1 200 OK"));
            // The second wait starts at about 200 ms and ends 300 ms later, not at 300 ms.
            let answered = std::time::Instant::now();
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
                .await
                .unwrap()
                .unwrap();
            assert!(rest.is_empty());
            let waited = answered.elapsed();
            assert!(
                waited >= Duration::from_millis(250),
                "closed after {waited:?}"
            );
        }
    }
}
