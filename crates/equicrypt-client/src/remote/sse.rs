//! Incremental server-sent-events parser (the WHATWG "event stream" format).
//!
//! Bytes arrive in arbitrary chunks (a TCP read can end anywhere — inside a field name, inside a
//! multi-byte UTF-8 character, between the `\r` and `\n` of a line ending); [`SseParser::push`]
//! buffers partial lines and returns every event completed by the chunk. An event is dispatched on
//! a blank line; `data` lines are joined with `\n`; `:` lines are comments (keep-alive pings);
//! `id` and `retry` are accepted and ignored; unknown fields are ignored, as the specification
//! says. Lines end in `\n`, `\r\n` or a lone `\r`.
//!
//! Invariants: the result of feeding a byte string is independent of how it is split into chunks;
//! memory is bounded by [`MAX_EVENT_BYTES`] (a longer line or event is an error, never an
//! allocation without limit); nothing here panics on any input.

use crate::{ClientError, Result};

/// Largest accepted line or event payload (bytes). A completion event is a few hundred bytes; a
/// non-streamed response with `n_probs` can reach a few MB.
pub const MAX_EVENT_BYTES: usize = 16 << 20;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` name (`None` for the default `message` type).
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Incremental parser; see the module docs.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` at the start of the next one belongs to it.
    after_cr: bool,
    /// Data lines of the event being assembled.
    data: Vec<u8>,
    /// Whether any `data` field was seen for the current event.
    has_data: bool,
    /// `event:` field of the current event.
    event: Option<String>,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one chunk; returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>> {
        let mut out = Vec::new();
        let mut rest = chunk;
        if rest.is_empty() {
            return Ok(out);
        }
        if self.after_cr {
            self.after_cr = false;
            if let Some((&b'\n', tail)) = rest.split_first() {
                rest = tail;
            }
        }
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.extend_line(rest)?;
                    break;
                }
                Some(i) => {
                    self.extend_line(&rest[..i])?;
                    let eol = rest[i];
                    rest = &rest[i + 1..];
                    if eol == b'\r' {
                        match rest.first() {
                            Some(b'\n') => rest = &rest[1..],
                            Some(_) => {}
                            // The `\n` of a `\r\n` may arrive in the next chunk.
                            None => self.after_cr = true,
                        }
                    }
                    let line = std::mem::take(&mut self.line);
                    if let Some(ev) = self.process_line(&line)? {
                        out.push(ev);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Ends the stream. A final line without its terminator is processed, but an event that was
    /// never closed by a blank line is discarded (as the specification requires); returns whether
    /// such an unterminated event was pending, which callers may treat as truncation.
    pub fn finish(&mut self) -> Result<bool> {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            // A dispatch cannot happen here: the line is not empty.
            let _ = self.process_line(&line)?;
        }
        let pending = self.has_data || self.event.is_some();
        self.data.clear();
        self.has_data = false;
        self.event = None;
        Ok(pending)
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<()> {
        if self.line.len() + bytes.len() > MAX_EVENT_BYTES {
            return Err(ClientError::MalformedResponse(format!(
                "server-sent event line longer than {MAX_EVENT_BYTES} bytes"
            )));
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn process_line(&mut self, line: &[u8]) -> Result<Option<SseEvent>> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return Ok(None); // comment / keep-alive
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        match name {
            b"data" => {
                if self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                    return Err(ClientError::MalformedResponse(format!(
                        "server-sent event larger than {MAX_EVENT_BYTES} bytes"
                    )));
                }
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.event = Some(utf8(value, "event name")?);
            }
            // `id`, `retry` and unknown fields carry nothing this client needs.
            _ => {}
        }
        Ok(None)
    }

    fn dispatch(&mut self) -> Result<Option<SseEvent>> {
        let event = self.event.take();
        if !self.has_data {
            // The specification drops events without data.
            return Ok(None);
        }
        self.has_data = false;
        let data = std::mem::take(&mut self.data);
        Ok(Some(SseEvent {
            event,
            data: utf8(&data, "event data")?,
        }))
    }
}

fn utf8(bytes: &[u8], what: &str) -> Result<String> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ClientError::MalformedResponse(format!("server-sent {what} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_all(chunks: &[&[u8]]) -> Result<(Vec<SseEvent>, bool)> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(p.push(c)?);
        }
        let pending = p.finish()?;
        Ok((out, pending))
    }

    fn ev(data: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: data.to_string(),
        }
    }

    #[test]
    fn basic_events_comments_and_fields() {
        let s = b": ping\n\ndata: {\"a\":1}\n\nevent: error\ndata: x\ndata:  y\nid: 7\nretry: 10\n\ndata\n\n";
        let (evs, pending) = parse_all(&[s]).unwrap();
        assert!(!pending);
        assert_eq!(
            evs,
            vec![
                ev("{\"a\":1}"),
                SseEvent {
                    event: Some("error".into()),
                    data: "x\n y".into()
                },
                ev(""),
            ]
        );
    }

    #[test]
    fn line_endings_crlf_and_lone_cr() {
        let (evs, _) = parse_all(&[b"data: a\r\n\r\ndata: b\r\rdata: c\n\n"]).unwrap();
        assert_eq!(evs, vec![ev("a"), ev("b"), ev("c")]);
        // `\r` | `\n` split across chunks is still one line ending.
        let (evs, _) = parse_all(&[b"data: a\r", b"\n\r", b"\ndata: b\n\n"]).unwrap();
        assert_eq!(evs, vec![ev("a"), ev("b")]);
    }

    #[test]
    fn unterminated_event_is_reported_not_dispatched() {
        let (evs, pending) = parse_all(&[b"data: a\n\ndata: {\"trunc"]).unwrap();
        assert_eq!(evs, vec![ev("a")]);
        assert!(pending);
    }

    #[test]
    fn invalid_utf8_is_an_error_not_a_panic() {
        assert!(matches!(
            parse_all(&[b"data: \xff\xfe\n\n"]),
            Err(ClientError::MalformedResponse(_))
        ));
    }

    #[test]
    fn oversized_line_is_an_error() {
        let mut p = SseParser::new();
        let big = vec![b'x'; 1 << 20];
        let mut res = Ok(Vec::new());
        for _ in 0..(MAX_EVENT_BYTES / big.len() + 2) {
            res = p.push(&big);
            if res.is_err() {
                break;
            }
        }
        assert!(matches!(res, Err(ClientError::MalformedResponse(_))));
    }

    fn arb_stream() -> impl Strategy<Value = Vec<u8>> {
        // Events built from pieces that exercise every branch, including multi-byte UTF-8.
        let line = prop_oneof![
            "[a-z{}\":, 0-9]{0,12}".prop_map(|s| format!("data: {s}")),
            "[a-zé€😀]{0,6}".prop_map(|s| format!("data:{s}")),
            Just(": keep-alive".to_string()),
            Just("event: error".to_string()),
            Just("id: 1".to_string()),
            Just("data".to_string()),
            Just(String::new()),
        ];
        let eol = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
        proptest::collection::vec((line, eol), 0..40).prop_map(|v| {
            let mut s = String::new();
            for (l, e) in v {
                s.push_str(&l);
                s.push_str(e);
            }
            s.into_bytes()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Splitting the byte stream anywhere (inside UTF-8 characters, between `\r` and `\n`)
        /// gives exactly the events of the unsplit stream.
        #[test]
        fn chunking_does_not_change_events(
            bytes in arb_stream(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let whole = parse_all(&[&bytes]).unwrap();
            let mut pos: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            pos.push(0);
            pos.push(bytes.len());
            pos.sort_unstable();
            let chunks: Vec<&[u8]> = pos.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
            let split = parse_all(&chunks).unwrap();
            prop_assert_eq!(whole, split);
        }

        /// Byte-at-a-time feeding of arbitrary bytes never panics.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut p = SseParser::new();
            for b in &bytes {
                let _ = p.push(std::slice::from_ref(b));
            }
            let _ = p.finish();
        }
    }
}
