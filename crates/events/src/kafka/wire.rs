//! Reading an encoded envelope's time and headers, which the producer puts on the Kafka
//! record as its timestamp and headers, without parsing the whole envelope.
//!
//! The fast path walks the top-level JSON object byte by byte, skipping every value it does
//! not need with `memchr` (strings to their closing quote, objects and arrays to their
//! matching bracket); only `time` and the `headers` strings are read. Anything it does not
//! expect (escapes in a header, a non-string time, malformed text) sends the value to
//! `serde_json` instead, so the result never depends on the shortcut.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Deserialize;

/// What the producer takes from an envelope.
#[derive(Debug, PartialEq)]
pub(super) struct Wire<'a> {
    /// The envelope's `time`.
    pub(super) time: Option<SystemTime>,
    /// The envelope's `headers`, in their encoded order.
    pub(super) headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

/// Reads time and headers from an encoded envelope; `None` when it is not a JSON object.
pub(super) fn read(value: &[u8]) -> Option<Wire<'_>> {
    fast(value).or_else(|| slow(value))
}

fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text).ok()
}

/// The fields the slow path reads (everything else is skipped by serde).
#[derive(Deserialize)]
struct WireView<'a> {
    #[serde(borrow)]
    time: Cow<'a, str>,
    #[serde(default, borrow)]
    headers: BTreeMap<Cow<'a, str>, Cow<'a, str>>,
}

fn slow(value: &[u8]) -> Option<Wire<'_>> {
    let view: WireView<'_> = serde_json::from_slice(value).ok()?;
    Some(Wire {
        time: parse_time(&view.time),
        headers: view.headers.into_iter().collect(),
    })
}

/// A cursor over JSON text.
struct Scan<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn skip_space(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.text.get(self.at) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_space();
        self.text.get(self.at).copied()
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// A string: its raw contents, and whether they hold escapes.
    fn string(&mut self) -> Option<(&'a [u8], bool)> {
        self.expect(b'"')?;
        let start = self.at;
        let mut escaped = false;
        loop {
            let found = memchr::memchr2(b'"', b'\\', self.text.get(self.at..)?)?;
            self.at += found;
            if self.text[self.at] == b'\\' {
                escaped = true;
                self.at += 2;
            } else {
                let contents = &self.text[start..self.at];
                self.at += 1;
                return Some((contents, escaped));
            }
        }
    }

    /// Skips one value of any kind.
    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            open @ (b'{' | b'[') => {
                let close = if open == b'{' { b'}' } else { b']' };
                let mut depth = 0usize;
                loop {
                    let found = memchr::memchr3(b'"', open, close, self.text.get(self.at..)?)?;
                    self.at += found;
                    match self.text[self.at] {
                        b'"' => {
                            self.string()?;
                        }
                        byte if byte == open => {
                            depth += 1;
                            self.at += 1;
                        }
                        _ => {
                            depth = depth.checked_sub(1)?;
                            self.at += 1;
                            if depth == 0 {
                                break;
                            }
                        }
                    }
                }
            }
            _ => {
                // A number, true, false or null.
                let start = self.at;
                while let Some(byte) = self.text.get(self.at) {
                    if matches!(byte, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') {
                        break;
                    }
                    self.at += 1;
                }
                if self.at == start {
                    return None;
                }
            }
        }
        Some(())
    }
}

fn utf8(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

fn fast(value: &[u8]) -> Option<Wire<'_>> {
    let mut scan = Scan { text: value, at: 0 };
    scan.expect(b'{')?;
    let mut time = None;
    let mut headers = Vec::new();
    if scan.peek()? != b'}' {
        loop {
            let (key, escaped) = scan.string()?;
            if escaped {
                return None;
            }
            scan.expect(b':')?;
            match key {
                b"time" => {
                    let (text, escaped) = scan.string()?;
                    if escaped {
                        return None;
                    }
                    time = parse_time(utf8(text)?);
                }
                b"headers" => read_headers(&mut scan, &mut headers)?,
                _ => scan.skip_value()?,
            }
            match scan.peek()? {
                b',' => scan.at += 1,
                b'}' => break,
                _ => return None,
            }
        }
    }
    scan.at += 1;
    scan.skip_space();
    (scan.at == value.len()).then_some(Wire { time, headers })
}

/// Reads a `{"name": "value", …}` object of plain strings.
fn read_headers<'a>(
    scan: &mut Scan<'a>,
    headers: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>,
) -> Option<()> {
    scan.expect(b'{')?;
    if scan.peek()? == b'}' {
        scan.at += 1;
        return Some(());
    }
    loop {
        let (name, name_escaped) = scan.string()?;
        scan.expect(b':')?;
        let (value, value_escaped) = scan.string()?;
        if name_escaped || value_escaped {
            return None;
        }
        headers.push((Cow::Borrowed(utf8(name)?), Cow::Borrowed(utf8(value)?)));
        match scan.peek()? {
            b',' => scan.at += 1,
            b'}' => {
                scan.at += 1;
                return Some(());
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    fn envelope(payload: serde_json::Value, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut message = Message::new(payload).key("k\"1");
        for (name, value) in headers {
            message = message.header(*name, *value);
        }
        message.into_envelope("t", "s").unwrap().to_bytes().unwrap()
    }

    fn sorted(wire: Wire<'_>) -> (Option<SystemTime>, Vec<(String, String)>) {
        let mut headers: Vec<(String, String)> = wire
            .headers
            .into_iter()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        headers.sort();
        (wire.time, headers)
    }

    #[test]
    fn fast_path_agrees_with_serde() {
        let payloads = [
            serde_json::json!({"x": 1}),
            serde_json::json!({"time": "1999-01-01T00:00:00Z", "headers": {"a": "b"}}),
            serde_json::json!(["{", "}", "\"time\":\"x\"", [1, [2, {"headers": 3}]]]),
            serde_json::json!("a \"string\" with \\ and { braces ["),
            serde_json::json!(42.5e3),
            serde_json::json!(null),
            serde_json::json!(true),
            serde_json::json!({"nested": {"deep": [{"}": "]"}]}, "ü": "ß"}),
        ];
        let header_sets: [&[(&str, &str)]; 3] = [
            &[],
            &[("traceparent", "00-abc-def-01"), ("x-tenant", "t1")],
            &[("payload", "p"), ("zz", "ü \u{1F600}")],
        ];
        for payload in &payloads {
            for headers in header_sets {
                for bytes in [
                    envelope(payload.clone(), headers),
                    serde_json::to_vec_pretty(
                        &serde_json::from_slice::<serde_json::Value>(&envelope(
                            payload.clone(),
                            headers,
                        ))
                        .unwrap(),
                    )
                    .unwrap(),
                ] {
                    let fast = fast(&bytes).expect("the fast path reads it");
                    let slow = slow(&bytes).unwrap();
                    assert!(fast.time.is_some());
                    assert_eq!(
                        sorted(fast),
                        sorted(slow),
                        "{}",
                        String::from_utf8_lossy(&bytes)
                    );
                }
            }
        }
    }

    #[test]
    fn escapes_and_garbage_fall_back_or_fail() {
        let escaped = envelope(serde_json::json!(1), &[("quote", "a \"quoted\" value")]);
        assert_eq!(fast(&escaped), None, "escaped header: left to serde");
        let wire = read(&escaped).unwrap();
        assert_eq!(wire.headers[0].1, "a \"quoted\" value");
        for bad in [
            &b""[..],
            b"not json",
            b"{",
            b"{\"time\":",
            b"{\"time\":\"2020-01-01T00:00:00Z\"",
            b"{\"a\":{\"b\":1}",
            b"{\"a\":1}}",
            b"{\"a\":\"x}",
            b"[1,2]",
            b"{\"a\":}",
        ] {
            assert_eq!(fast(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(read(b"{\"time\": 5}"), None, "time must be a string");
    }

    #[test]
    fn random_strings_never_confuse_the_scanner() {
        // A small deterministic generator over the characters that matter to a scanner.
        let alphabet: Vec<char> = "ab\"\\{}[]:, \n\tü".chars().collect();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2_000 {
            let mut text = String::new();
            for _ in 0..(next() % 24) {
                text.push(alphabet[(next() % alphabet.len() as u64) as usize]);
            }
            let bytes = envelope(
                serde_json::json!({ text.clone(): [text.clone(), {"k": text.clone()}] }),
                &[("h", "v"), ("n", "plain")],
            );
            let fast = fast(&bytes).expect("plain headers read fast");
            assert_eq!(sorted(fast), sorted(slow(&bytes).unwrap()), "{text:?}");
        }
    }
}
