//! Incremental, UTF-8-safe detokenization of a stream of plaintext token ids.
//!
//! A single byte-level BPE token can hold part of a multi-byte character (emoji are often split
//! over two or three tokens). [`StreamDecoder`] buffers such partial sequences and only emits
//! complete characters.
//!
//! Invariant: for any id sequence, the concatenation of every [`StreamDecoder::push`] result
//! followed by [`StreamDecoder::finish`] equals
//! [`GgufTokenizer::decode_with`]`(ids, render_special)` (which is `String::from_utf8_lossy` of
//! the concatenated token bytes). Every emitted chunk is a whole `String`, so it never splits a
//! character; invalid byte sequences become U+FFFD exactly where the whole-sequence lossy decode
//! puts them.

use crate::tokenizer::GgufTokenizer;
use crate::Result;

/// Streaming detokenizer over a borrowed [`GgufTokenizer`].
#[derive(Debug, Clone)]
pub struct StreamDecoder<'t> {
    tok: &'t GgufTokenizer,
    render_special: bool,
    /// Bytes not emitted yet: always a (possibly empty) prefix of one incomplete UTF-8 sequence.
    pending: Vec<u8>,
}

impl<'t> StreamDecoder<'t> {
    /// A decoder that renders control tokens as their text (like [`GgufTokenizer::decode`]).
    pub fn new(tok: &'t GgufTokenizer) -> Self {
        Self::with_special(tok, true)
    }

    /// A decoder that renders control/unknown tokens only when `render_special` is true.
    pub fn with_special(tok: &'t GgufTokenizer, render_special: bool) -> Self {
        Self {
            tok,
            render_special,
            pending: Vec::new(),
        }
    }

    /// The tokenizer this decoder reads token bytes from.
    pub fn tokenizer(&self) -> &'t GgufTokenizer {
        self.tok
    }

    /// Number of buffered bytes of an incomplete character (0..=3).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Appends one plaintext token and returns the text that became complete (possibly empty).
    /// An id outside the vocabulary is an error and leaves the decoder unchanged.
    pub fn push(&mut self, id: u32) -> Result<String> {
        let bytes = self.tok.token_bytes(id)?;
        if !self.render_special && self.tok.is_control(id) {
            return Ok(String::new());
        }
        self.pending.extend_from_slice(bytes);
        Ok(self.drain_complete())
    }

    /// Flushes the buffered bytes; an unfinished character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }

    /// Emits everything up to the last (possibly) incomplete sequence at the end of `pending`.
    fn drain_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[start..valid]).expect("validated prefix"),
                    );
                    match e.error_len() {
                        // Invalid regardless of what follows: same U+FFFD as the lossy decode.
                        Some(len) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + len;
                        }
                        // Incomplete sequence at the end: wait for more bytes.
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}
