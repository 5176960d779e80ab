//! llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm`, `LLAMA_VOCAB_TYPE_SPM`,
//! `tokenizer.ggml.model = "llama"`), applied to one text fragment left by the special-token
//! partition.
//!
//! Algorithm, exactly as llama.cpp's `llm_tokenizer_spm_session::tokenize`:
//!
//! 1. the fragment (with a leading space when the caller asks for llama.cpp's space prefix) has
//!    every `' '` replaced by U+2581 `'▁'`;
//! 2. every UTF-8 character becomes a symbol;
//! 3. a priority queue holds every adjacent pair whose concatenated text is a vocabulary token,
//!    ordered by that token's score (highest first), ties by the left symbol's index (lowest
//!    first); the best pair is merged, stale pairs are skipped, and the new symbol's pairs with
//!    its neighbours are queued, until the queue is empty;
//! 4. each final symbol is emitted as its token; a symbol that is not a token (only a single
//!    character can be one: every merge result is a token) falls back to one byte token `<0xXX>`
//!    per UTF-8 byte, else to the single-byte token of that byte, else to the unknown token.
//!
//! llama.cpp's `resegment` also consults the merges recorded by text (`rev_merge`), but for valid
//! UTF-8 input that lookup can never succeed (its keys are at least two characters long, and only
//! single characters reach it), so it is not reproduced. Where llama.cpp throws because a byte has
//! neither a byte token nor a single-byte token, this falls back to the unknown token (and
//! reports an error when there is none).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::{ClientError, Result};

/// The character llama.cpp writes for a space in SPM token texts.
pub(crate) const SPACE_MARK: char = '\u{2581}';

/// Marker of "no symbol" in the linked list of symbols.
const NONE: usize = usize::MAX;

/// The SPM model: token lookup by text, scores and the byte fallback.
#[derive(Clone)]
pub(crate) struct Spm {
    /// Every token text (all types, as llama.cpp's `token_to_id`) → id.
    ids: HashMap<String, u32>,
    /// Score of every id (`tokenizer.ggml.scores`; `-0.0` stored as `0.0` so that it ties with
    /// `0.0` as in C++).
    scores: Vec<f32>,
    /// Fallback token of each byte: `<0xXX>`, else the one-byte token text.
    byte_ids: [Option<u32>; 256],
    /// The unknown token, used for a byte with no fallback token.
    unk: Option<u32>,
    /// `tokenizer.ggml.add_space_prefix`.
    add_space_prefix: bool,
}

impl Spm {
    /// Builds the model. `scores.len()` must be the vocabulary size and every id in `ids` must
    /// be below it (checked by the caller).
    pub(crate) fn new(
        ids: HashMap<String, u32>,
        scores: Vec<f32>,
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Self {
        let scores = scores
            .into_iter()
            .map(|s| if s == 0.0 { 0.0 } else { s })
            .collect();
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let hex = format!("<0x{b:02X}>");
            *slot = ids.get(hex.as_str()).copied().or_else(|| {
                // llama.cpp falls back to the byte itself as a text; only ASCII bytes are
                // valid one-byte UTF-8 token texts.
                u8::try_from(b)
                    .ok()
                    .filter(u8::is_ascii)
                    .and_then(|b| ids.get(char::from(b).to_string().as_str()).copied())
            });
        }
        Self {
            ids,
            scores,
            byte_ids,
            unk,
            add_space_prefix,
        }
    }

    /// Looks up a token by its exact text.
    pub(crate) fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// Whether a space is prepended to a text fragment that starts the input or follows a
    /// special token (llama.cpp's `add_space_prefix && is_prev_special`).
    pub(crate) fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    fn score(&self, id: u32) -> f32 {
        self.scores.get(id as usize).copied().unwrap_or(0.0)
    }

    fn byte_token(&self, b: u8) -> Result<u32> {
        self.byte_ids[b as usize].or(self.unk).ok_or_else(|| {
            ClientError::Tokenizer(format!(
                "byte 0x{b:02X} has no byte token and the vocabulary has no unknown token"
            ))
        })
    }

    /// Tokenizes one raw text fragment, appending the ids to `out`; `prepend_space` adds the
    /// leading space of llama.cpp's `add_space_prefix`.
    pub(crate) fn encode_fragment(
        &self,
        fragment: &str,
        prepend_space: bool,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let mut text = String::with_capacity(fragment.len() + 3);
        if prepend_space {
            text.push(SPACE_MARK);
        }
        text.extend(
            fragment
                .chars()
                .map(|c| if c == ' ' { SPACE_MARK } else { c }),
        );
        if text.is_empty() {
            return Ok(());
        }
        Session::new(self, &text).run(out)
    }
}

/// One symbol of the working text: a byte range plus links to its live neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    /// Length in bytes; 0 once merged into its left neighbour.
    len: usize,
    prev: usize,
    next: usize,
}

/// A candidate merge of two adjacent symbols.
#[derive(Clone, Copy)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text when the bigram was queued (detects stale entries).
    size: usize,
}

impl Ord for Bigram {
    /// llama.cpp's `llm_bigram_spm::comparator` for a max-heap: the higher score first, then
    /// the lower left index. (NaN scores get `total_cmp`'s order.)
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

/// The state of one fragment's tokenization (llama.cpp's `llm_tokenizer_spm_session`).
struct Session<'a> {
    spm: &'a Spm,
    text: &'a str,
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Bigram>,
}

impl<'a> Session<'a> {
    fn new(spm: &'a Spm, text: &'a str) -> Self {
        let n = text.chars().count();
        let symbols = text
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Symbol {
                start,
                len: c.len_utf8(),
                prev: if i == 0 { NONE } else { i - 1 },
                next: if i + 1 == n { NONE } else { i + 1 },
            })
            .collect();
        Self {
            spm,
            text,
            symbols,
            queue: BinaryHeap::with_capacity(n),
        }
    }

    fn try_add_bigram(&mut self, left: usize, right: usize) {
        if left == NONE || right == NONE {
            return;
        }
        let l = self.symbols[left];
        let size = l.len + self.symbols[right].len;
        let Some(id) = self.spm.token_id(&self.text[l.start..l.start + size]) else {
            return;
        };
        self.queue.push(Bigram {
            score: self.spm.score(id),
            left,
            right,
            size,
        });
    }

    fn run(mut self, out: &mut Vec<u32>) -> Result<()> {
        for i in 1..self.symbols.len() {
            self.try_add_bigram(i - 1, i);
        }
        while let Some(bigram) = self.queue.pop() {
            let (l, r) = (self.symbols[bigram.left], self.symbols[bigram.right]);
            // One of the symbols already got merged (or grew): skip the stale pair.
            if l.len == 0 || r.len == 0 || l.len + r.len != bigram.size {
                continue;
            }
            // Merge the right symbol into the left one and unlink it.
            self.symbols[bigram.left].len += r.len;
            self.symbols[bigram.left].next = r.next;
            self.symbols[bigram.right].len = 0;
            if r.next != NONE {
                self.symbols[r.next].prev = bigram.left;
            }
            self.try_add_bigram(l.prev, bigram.left);
            self.try_add_bigram(bigram.left, r.next);
        }

        let mut i = 0;
        while i != NONE {
            let sym = self.symbols[i];
            let piece = &self.text[sym.start..sym.start + sym.len];
            match self.spm.token_id(piece) {
                Some(id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        out.push(self.spm.byte_token(b)?);
                    }
                }
            }
            i = sym.next;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary from (text, score) pairs, ids in order.
    fn spm(tokens: &[(&str, f32)], unk: Option<u32>) -> Spm {
        let ids = tokens
            .iter()
            .enumerate()
            .map(|(i, (t, _))| ((*t).to_string(), i as u32))
            .collect();
        let scores = tokens.iter().map(|(_, s)| *s).collect();
        Spm::new(ids, scores, unk, false)
    }

    fn enc(spm: &Spm, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        spm.encode_fragment(text, false, &mut out).unwrap();
        out
    }

    #[test]
    fn highest_score_merges_first() {
        // "abc": "ab" (-1) beats "bc" (-2), then "abc" is not a token.
        let s = spm(
            &[
                ("a", 0.0),
                ("b", 0.0),
                ("c", 0.0),
                ("ab", -1.0),
                ("bc", -2.0),
            ],
            None,
        );
        assert_eq!(enc(&s, "abc"), vec![3, 2]);
        let s = spm(
            &[
                ("a", 0.0),
                ("b", 0.0),
                ("c", 0.0),
                ("ab", -2.0),
                ("bc", -1.0),
            ],
            None,
        );
        assert_eq!(enc(&s, "abc"), vec![0, 4]);
    }

    #[test]
    fn ties_go_to_the_leftmost_pair() {
        // "aaa": both "aa" pairs have the same score; the left one merges.
        let s = spm(&[("a", 0.0), ("aa", -1.0)], None);
        assert_eq!(enc(&s, "aaa"), vec![1, 0]);
        assert_eq!(enc(&s, "aaaa"), vec![1, 1]);
        // -0.0 ties with 0.0 (C++ `<` / `==`), so the leftmost pair still wins.
        let s = spm(&[("x", 0.0), ("y", 0.0), ("xy", -0.0), ("yx", 0.0)], None);
        assert_eq!(enc(&s, "xyx"), vec![2, 0]);
    }

    #[test]
    fn merges_chain_through_intermediate_tokens() {
        let s = spm(
            &[
                ("\u{2581}", 0.0),
                ("h", 0.0),
                ("e", 0.0),
                ("l", 0.0),
                ("o", 0.0),
                ("he", -1.0),
                ("ll", -2.0),
                ("hell", -3.0),
                ("hello", -4.0),
                ("\u{2581}hello", -5.0),
            ],
            None,
        );
        assert_eq!(enc(&s, " hello"), vec![9]);
        assert_eq!(enc(&s, "hello hell"), vec![8, 0, 7]);
        // The caller's space prefix adds the leading mark.
        let mut out = Vec::new();
        s.encode_fragment("hello", true, &mut out).unwrap();
        assert_eq!(out, vec![9]);
    }

    #[test]
    fn byte_fallback_then_unknown() {
        let mut tokens: Vec<(String, f32)> = vec![("<unk>".into(), 0.0), ("a".into(), 0.0)];
        tokens.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0)));
        let refs: Vec<(&str, f32)> = tokens.iter().map(|(t, s)| (t.as_str(), *s)).collect();
        let s = spm(&refs, Some(0));
        // "é" = C3 A9 is not a token: two byte tokens.
        assert_eq!(enc(&s, "aé"), vec![1, 2 + 0xC3, 2 + 0xA9]);

        // No byte tokens: the single-byte text token for ASCII, else the unknown token.
        let s = spm(&[("<unk>", 0.0), ("a", 0.0)], Some(0));
        assert_eq!(enc(&s, "ab€"), vec![1, 0, 0, 0, 0]);
        // Nothing to fall back to: an error, not a panic.
        let s = spm(&[("a", 0.0)], None);
        assert!(matches!(
            s.encode_fragment("ab", false, &mut Vec::new()),
            Err(ClientError::Tokenizer(_))
        ));
    }

    #[test]
    fn long_input_is_linearithmic() {
        let s = spm(&[("a", 0.0), ("aa", -1.0), ("aaaa", -2.0)], None);
        let text = "a".repeat(200_000);
        let ids = enc(&s, &text);
        assert_eq!(ids.len(), 50_000);
        assert!(ids.iter().all(|&i| i == 2));
    }
}
