//! A llama.cpp-exact tokenizer built from a plaintext GGUF file's `tokenizer.*` metadata.
//!
//! Two tokenizer families (`tokenizer.ggml.model`), as llama.cpp's `llama_vocab::impl::tokenize`:
//!
//! * `gpt2` (`LLAMA_VOCAB_TYPE_BPE`, e.g. SmolLM2):
//!   1. **Special-token partition** — like llama.cpp's `tokenizer_st_partition`: special tokens
//!      (control, unknown and user-defined types) are matched in the raw text, longest token
//!      text first, each one splitting every remaining text fragment at all of its occurrences.
//!      Control/unknown tokens are only matched when `parse_special` is true; user-defined tokens
//!      are always matched (as in llama.cpp).
//!   2. **Pre-tokenizer** per `tokenizer.ggml.pre`, expressed as `tokenizers` `Split`
//!      pre-tokenizers (isolated matches, exactly like llama.cpp's `unicode_regex_split`), then
//!      the byte-level mapping.
//!   3. **Byte-level BPE** with the GGUF vocabulary and ranked merges (`tokenizers` BPE model).
//! * `llama` (`LLAMA_VOCAB_TYPE_SPM`, SentencePiece, e.g. Gemma 3): the same special-token
//!   partition, then llama.cpp's `llm_tokenizer_spm` on every text fragment (score-ordered
//!   merges of adjacent pieces with `tokenizer.ggml.scores`, byte fallback to `<0xXX>` tokens;
//!   see the `spm` module). `tokenizer.ggml.add_space_prefix` (default true, as in llama.cpp)
//!   prepends a space to a text fragment at the start or after a special token; spaces are
//!   written `▁` (U+2581). `tokenizer.ggml.pre` is ignored, as llama.cpp does for SPM.
//!
//! Invariants of a constructed [`GgufTokenizer`]: token texts are unique, every BPE merge's parts
//! and result are in the vocabulary, SPM scores cover the vocabulary, and every id
//! `< vocab_size()` has a decoded piece.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab as BpeVocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::spm::{Spm, SPACE_MARK};
use crate::{ClientError, Result};

/// GGUF key naming the tokenizer family.
pub(crate) const KEY_MODEL: &str = "tokenizer.ggml.model";
/// GGUF key naming the pre-tokenizer.
pub(crate) const KEY_PRE: &str = "tokenizer.ggml.pre";
/// GGUF key with the token texts.
pub(crate) const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
/// GGUF key with the token types.
pub(crate) const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
/// GGUF key with the BPE merges.
pub(crate) const KEY_MERGES: &str = "tokenizer.ggml.merges";
/// GGUF key with the SentencePiece token scores.
const KEY_SCORES: &str = "tokenizer.ggml.scores";
pub(crate) const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
pub(crate) const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_UNK: &str = "tokenizer.ggml.unknown_token_id";
const KEY_EOT: &str = "tokenizer.ggml.eot_token_id";
const KEY_EOM: &str = "tokenizer.ggml.eom_token_id";
const KEY_FIM_PAD: &str = "tokenizer.ggml.fim_pad_token_id";
const KEY_FIM_REP: &str = "tokenizer.ggml.fim_rep_token_id";
const KEY_FIM_SEP: &str = "tokenizer.ggml.fim_sep_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

/// llama.cpp's GPT-2 pre-tokenizer regex (`unicode_regex_split_custom_gpt2`) as a `Split`
/// pattern. The trailing `\s+` alternative covers the lone whitespace character llama.cpp emits
/// as an unmatched piece. Unassigned codepoints carry llama.cpp's non-zero `UNDEFINED` flag, so
/// they group with punctuation exactly as `[^\s\p{L}\p{N}]` does (checked by fuzzing).
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Token texts llama.cpp auto-detects as end-of-turn (`special_eot_id`).
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<end_of_utterance>",
];
/// Token texts llama.cpp auto-detects as end-of-message.
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
/// Token texts llama.cpp auto-detects as FIM pad / repo / file-separator tokens (all are EOG).
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Token texts llama.cpp always treats as end-of-generation.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
];
/// Tokens llama.cpp forces to the user-defined type (always rendered, always matched).
const FORCED_USER_DEFINED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// The type of a token, as stored in `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenAttr {
    /// Type 0 or an unknown type number: never produced by the BPE, decodes to nothing.
    Undefined,
    /// Type 1: an ordinary byte-level BPE token.
    Normal,
    /// Type 2: the unknown token (special; matched only with `parse_special`).
    Unknown,
    /// Type 3: a control token such as `<|im_start|>` (matched only with `parse_special`).
    Control,
    /// Type 4: a user-defined token (always matched in text, decodes to its literal text).
    UserDefined,
    /// Type 5: an unused slot; decodes to nothing.
    Unused,
    /// Type 6: a raw byte token (`<0xHH>`).
    Byte,
}

impl TokenAttr {
    /// Maps a GGUF token type number to its attribute (unknown numbers → `Undefined`).
    pub fn from_gguf_type(t: i64) -> Self {
        match t {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }

    /// Whether llama.cpp's special-token partition considers this token at all.
    fn is_special(self) -> bool {
        matches!(self, Self::Unknown | Self::Control | Self::UserDefined)
    }
}

/// The tokenizer family named by `tokenizer.ggml.model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenizerModel {
    /// `gpt2`: byte-level BPE with ranked merges (llama.cpp's `LLAMA_VOCAB_TYPE_BPE`).
    Bpe,
    /// `llama`: SentencePiece with scores and byte fallback (llama.cpp's `LLAMA_VOCAB_TYPE_SPM`).
    Spm,
}

impl TokenizerModel {
    /// Parses a `tokenizer.ggml.model` value.
    pub fn from_gguf_name(name: &str) -> Result<Self> {
        match name {
            "gpt2" => Ok(Self::Bpe),
            "llama" => Ok(Self::Spm),
            other => Err(ClientError::UnsupportedTokenizerModel(other.to_string())),
        }
    }
}

/// The pre-tokenizer named by `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PreTokenizerKind {
    /// `smollm` (and llama.cpp's aliases with the same regexes: `starcoder`, `refact`,
    /// `command-r`, `codeshell`, `exaone`, `minerva-7b`): every `\p{N}` split off alone, then the
    /// GPT-2 regex. Verified against llama.cpp by the golden test.
    Smollm,
    /// `gpt-2` (also accepted: `gpt2`, `phi-2`, `mpt`, `olmo`, `jais`): the GPT-2 regex only.
    Gpt2,
    /// `default` (also used by llama.cpp when the key is absent): llama.cpp's default chain
    /// `[\p{P}$+<=>^~|]+`, GPT-2, `\p{N}+`, `[0-9][0-9][0-9]`. SPM tokenizers always report
    /// this (they have no pre-tokenizer; llama.cpp ignores the key for them).
    Default,
    /// The normalizer and pre-tokenizer of a Hugging Face `tokenizer.json`, run by the
    /// `tokenizers` crate as transformers' fast tokenizer runs them (tokenizers built by
    /// [`GgufTokenizer::from_hf_dir`]).
    TokenizerJson,
}

impl PreTokenizerKind {
    /// Parses a `tokenizer.ggml.pre` value.
    pub fn from_gguf_name(name: &str) -> Result<Self> {
        match name {
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => Ok(Self::Smollm),
            "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" => Ok(Self::Gpt2),
            "default" => Ok(Self::Default),
            other => Err(ClientError::UnsupportedPreTokenizer(other.to_string())),
        }
    }

    /// The regexes applied in order, each splitting every piece into matches and non-matches.
    fn patterns(self) -> &'static [&'static str] {
        match self {
            Self::Smollm => &[r"\p{N}", GPT2_PATTERN],
            Self::Gpt2 => &[GPT2_PATTERN],
            Self::Default => &[
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_PATTERN,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            // Never built from GGUF metadata: the pipeline comes from `tokenizer.json`.
            Self::TokenizerJson => &[],
        }
    }
}

/// The model behind the special-token partition.
#[derive(Clone)]
enum Backend {
    /// BPE + pre-tokenizer, *without* added tokens (special tokens are partitioned by us).
    Bpe(Box<Tokenizer>),
    /// SentencePiece.
    Spm(Box<Spm>),
}

/// A tokenizer reconstructed from GGUF metadata (byte-level BPE or SentencePiece), matching
/// llama.cpp, or built from a Hugging Face checkpoint directory ([`GgufTokenizer::from_hf_dir`]:
/// byte-level BPE with `tokenizer.json`'s own pipeline, special tokens handled as for a GGUF).
///
/// Immutable after construction and cheap to share by reference (`Sync`).
#[derive(Clone)]
pub struct GgufTokenizer {
    backend: Backend,
    pre: PreTokenizerKind,
    texts: Vec<String>,
    attrs: Vec<TokenAttr>,
    /// Decoded bytes of every token (what llama.cpp's `token_to_piece(.., special=true)` gives).
    pieces: Vec<Vec<u8>>,
    /// Special token ids in partition order: longest text first, ties by id.
    special_order: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("model", &self.model())
            .field("vocab_size", &self.texts.len())
            .field("pre", &self.pre)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .finish_non_exhaustive()
    }
}

/// Reads only the header and metadata of a GGUF file.
pub(crate) fn read_gguf_content(path: &Path) -> Result<Content> {
    let err = |reason: String| ClientError::GgufRead {
        path: path.display().to_string(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut reader = std::io::BufReader::new(file);
    Content::read(&mut reader).map_err(|e| err(e.to_string()))
}

pub(crate) fn get<'m>(md: &'m HashMap<String, Value>, key: &str) -> Result<&'m Value> {
    md.get(key)
        .ok_or_else(|| ClientError::MissingKey(key.to_string()))
}

fn bad(key: &str, reason: impl Into<String>) -> ClientError {
    ClientError::BadMetadata {
        key: key.to_string(),
        reason: reason.into(),
    }
}

pub(crate) fn get_str<'m>(md: &'m HashMap<String, Value>, key: &str) -> Result<&'m str> {
    match get(md, key)? {
        Value::String(s) => Ok(s),
        v => Err(bad(
            key,
            format!("expected a string, found {:?}", v.value_type()),
        )),
    }
}

fn value_as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn opt_token_id(md: &HashMap<String, Value>, key: &str, vocab: usize) -> Result<Option<u32>> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let id = value_as_i64(v).ok_or_else(|| bad(key, "expected an integer"))?;
    // llama.cpp ignores (with a warning) ids outside the vocabulary; so do we.
    Ok(u32::try_from(id).ok().filter(|&id| (id as usize) < vocab))
}

fn get_str_array<'m>(md: &'m HashMap<String, Value>, key: &str) -> Result<Vec<&'m str>> {
    match get(md, key)? {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(bad(key, format!("element {i} is not a string"))),
            })
            .collect(),
        _ => Err(bad(key, "expected an array of strings")),
    }
}

/// The GPT-2 byte → char table (printable bytes map to themselves, others to U+0100...).
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let keep = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if keep {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).expect("valid codepoint");
            n += 1;
            c
        };
    }
    table
}

/// Undoes the byte-level mapping of a token text; characters outside the table keep their UTF-8.
fn byte_level_decode(text: &str, char_to_byte: &HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

/// Parses a `<0xHH>` byte-token text.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// `key` as a boolean, `None` when absent.
fn opt_bool(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(bad(
            key,
            format!("expected a boolean, found {:?}", v.value_type()),
        )),
    }
}

/// `tokenizer.ggml.scores` (f32 or i32 elements, at least `n`), all 0 when absent (llama.cpp).
fn get_scores(md: &HashMap<String, Value>, n: usize) -> Result<Vec<f32>> {
    let Some(v) = md.get(KEY_SCORES) else {
        return Ok(vec![0.0; n]);
    };
    let Value::Array(items) = v else {
        return Err(bad(KEY_SCORES, "expected an array"));
    };
    if items.len() < n {
        return Err(bad(
            KEY_SCORES,
            format!("{} scores for {n} tokens", items.len()),
        ));
    }
    items[..n]
        .iter()
        .map(|v| match v {
            Value::F32(x) => Ok(*x),
            Value::I32(x) => Ok(*x as f32),
            _ => Err(bad(KEY_SCORES, "expected f32 or i32 elements")),
        })
        .collect()
}

/// The decoded bytes of an SPM token (llama.cpp's `token_to_piece(.., special = true)` for
/// `LLAMA_VOCAB_TYPE_SPM`): control / unknown / user-defined tokens give their text, normal
/// tokens their text with `▁` → space, byte tokens their byte, the rest nothing.
fn spm_piece(text: &str, attr: TokenAttr) -> Vec<u8> {
    match attr {
        TokenAttr::Control | TokenAttr::Unknown | TokenAttr::UserDefined => {
            text.as_bytes().to_vec()
        }
        TokenAttr::Normal => text.replace(SPACE_MARK, " ").into_bytes(),
        TokenAttr::Byte => vec![spm_token_byte(text)],
        TokenAttr::Unused | TokenAttr::Undefined => Vec::new(),
    }
}

/// llama.cpp's `token_to_byte` for SPM: `strtol(text.substr(3, 2), 16)` (leading hex digits of
/// the two characters after `<0x`; 0 when there are none).
fn spm_token_byte(text: &str) -> u8 {
    if let Some(b) = parse_byte_token(text) {
        return b;
    }
    let mut value = 0u8;
    for &c in text.as_bytes().iter().skip(3).take(2) {
        match char::from(c).to_digit(16) {
            // Two hex digits at most: fits in a byte.
            Some(d) => value = value.wrapping_mul(16).wrapping_add(d as u8),
            None => break,
        }
    }
    value
}

/// The decoded piece of every token of a byte-level BPE vocabulary: normal tokens with the
/// byte-level mapping undone, byte tokens their byte, special tokens their literal text,
/// unused/undefined tokens nothing.
fn byte_level_pieces(texts: &[String], attrs: &[TokenAttr]) -> Vec<Vec<u8>> {
    let table = byte_to_char_table();
    let char_to_byte: HashMap<char, u8> = table
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect();
    texts
        .iter()
        .zip(attrs)
        .map(|(t, a)| match a {
            TokenAttr::Normal => byte_level_decode(t, &char_to_byte),
            TokenAttr::Control | TokenAttr::Unknown | TokenAttr::UserDefined => {
                t.as_bytes().to_vec()
            }
            TokenAttr::Byte => parse_byte_token(t)
                .map(|b| vec![b])
                .unwrap_or_else(|| byte_level_decode(t, &char_to_byte)),
            TokenAttr::Unused | TokenAttr::Undefined => Vec::new(),
        })
        .collect()
}

/// The `tokenizers` BPE pipeline of a `gpt2` vocabulary.
fn build_bpe(
    md: &HashMap<String, Value>,
    pre: PreTokenizerKind,
    vocab: HashMap<String, u32>,
) -> Result<Tokenizer> {
    let merges = get_str_array(md, KEY_MERGES)?
        .into_iter()
        .map(|m| {
            // llama.cpp: split at the first space after the first byte.
            let pos = m
                .bytes()
                .skip(1)
                .position(|b| b == b' ')
                .map(|p| p + 1)
                .ok_or_else(|| bad(KEY_MERGES, format!("merge {m:?} has no separator")))?;
            Ok((m[..pos].to_string(), m[pos + 1..].to_string()))
        })
        .collect::<Result<Vec<_>>>()?;

    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<BpeVocab>(), merges)
        .build()
        .map_err(|e| ClientError::Tokenizer(format!("building BPE model: {e}")))?;
    let mut steps = Vec::new();
    for pat in pre.patterns() {
        let split = Split::new(
            SplitPattern::Regex((*pat).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| ClientError::Tokenizer(format!("pre-tokenizer regex {pat:?}: {e}")))?;
        steps.push(PreTokenizerWrapper::Split(split));
    }
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    )));
    let mut raw = Tokenizer::new(bpe);
    raw.with_pre_tokenizer(Some(Sequence::new(steps)));
    raw.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(raw)
}

/// Special ids a tokenizer's source names explicitly (each `< vocab_size`, or `None`).
#[derive(Debug, Default)]
pub(crate) struct ExplicitSpecials {
    pub(crate) bos: Option<u32>,
    pub(crate) eos: Option<u32>,
    pub(crate) unk: Option<u32>,
    pub(crate) eot: Option<u32>,
    pub(crate) eom: Option<u32>,
    pub(crate) fim_pad: Option<u32>,
    pub(crate) fim_rep: Option<u32>,
    pub(crate) fim_sep: Option<u32>,
    /// Further end-of-generation ids (e.g. every id of a Hugging Face `eos_token_id` list);
    /// ids outside the vocabulary are ignored.
    pub(crate) extra_eog: Vec<u32>,
}

/// The resolved special tokens of a vocabulary.
struct Specials {
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    eog: Vec<u32>,
    special_order: Vec<u32>,
}

/// llama.cpp's special-token resolution (`llama_vocab::impl::load`): EOT / EOM / FIM ids
/// auto-detected by text where not given, control-looking tokens promoted to control type, the
/// end-of-generation set with llama.cpp's workarounds, forced user-defined tokens, and the
/// partition order (longest text first, ties by id).
fn resolve_specials(texts: &[String], attrs: &mut [TokenAttr], ex: ExplicitSpecials) -> Specials {
    let n = texts.len();
    let find_text = |list: &[&str]| {
        texts
            .iter()
            .position(|t| list.contains(&t.as_str()))
            .map(|i| i as u32)
    };
    let eot = ex.eot.or_else(|| find_text(EOT_TEXTS));
    let eom = ex.eom.or_else(|| find_text(EOM_TEXTS));
    let fim_pad = ex.fim_pad.or_else(|| find_text(FIM_PAD_TEXTS));
    let fim_rep = ex.fim_rep.or_else(|| find_text(FIM_REP_TEXTS));
    let fim_sep = ex.fim_sep.or_else(|| find_text(FIM_SEP_TEXTS));

    // llama.cpp promotes control-looking tokens to control type (it sets the CONTROL bit:
    // a user-defined token so marked, e.g. Gemma's `</s>`, then behaves as a control token:
    // matched only with `parse_special`, hidden when special tokens are not rendered).
    let promote: Vec<&[&str]> = vec![
        EOT_TEXTS,
        EOM_TEXTS,
        FIM_PAD_TEXTS,
        FIM_REP_TEXTS,
        FIM_SEP_TEXTS,
        EOG_TEXTS,
    ];
    for (i, t) in texts.iter().enumerate() {
        if promote.iter().any(|l| l.contains(&t.as_str())) && attrs[i] != TokenAttr::Unknown {
            attrs[i] = TokenAttr::Control;
        }
    }

    let mut eog: Vec<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
    eog.extend(
        texts
            .iter()
            .enumerate()
            .filter(|(_, t)| EOG_TEXTS.contains(&t.as_str()))
            .map(|(i, _)| i as u32),
    );
    eog.extend([ex.eos, eot, eom].into_iter().flatten());
    eog.extend(ex.extra_eog.iter().copied().filter(|&i| (i as usize) < n));
    eog.sort_unstable();
    eog.dedup();
    let has = |eog: &[u32], s: &str| eog.iter().any(|&i| texts[i as usize] == s);
    // llama.cpp workarounds: o200k_harmony / solar-open "<|end|>", gemma4 / paddleocr "</s>".
    if (has(&eog, "<|return|>") && has(&eog, "<|call|>") && has(&eog, "<|end|>"))
        || (has(&eog, "<|calls|>") && has(&eog, "<|flush|>") && has(&eog, "<|end|>"))
    {
        eog.retain(|&i| {
            if texts[i as usize] == "<|end|>" {
                attrs[i as usize] = TokenAttr::UserDefined;
                false
            } else {
                true
            }
        });
    }
    if has(&eog, "<|tool_response>") && has(&eog, "</s>") {
        eog.retain(|&i| {
            if texts[i as usize] == "</s>" {
                attrs[i as usize] = TokenAttr::Normal;
                false
            } else {
                true
            }
        });
    }
    for (i, t) in texts.iter().enumerate() {
        if FORCED_USER_DEFINED.contains(&t.as_str()) {
            attrs[i] = TokenAttr::UserDefined;
        }
    }

    let mut special_order: Vec<u32> = (0..n as u32)
        .filter(|&i| attrs[i as usize].is_special())
        .collect();
    special_order.sort_by_key(|&i| std::cmp::Reverse(texts[i as usize].len()));
    Specials {
        bos: ex.bos,
        eos: ex.eos,
        unk: ex.unk,
        eog,
        special_order,
    }
}

/// The set of bytes and of adjacent byte pairs of a text.
struct BytePairs {
    bytes: [bool; 256],
    /// Bit `a * 256 + b` is set when the text contains the bytes `a b` in a row.
    pairs: Vec<u64>,
}

impl BytePairs {
    fn new(text: &[u8]) -> Self {
        let mut bytes = [false; 256];
        let mut pairs = vec![0u64; 65536 / 64];
        for &b in text {
            bytes[b as usize] = true;
        }
        for w in text.windows(2) {
            let i = (usize::from(w[0]) << 8) | usize::from(w[1]);
            pairs[i / 64] |= 1 << (i % 64);
        }
        Self { bytes, pairs }
    }

    /// False only when `pat` cannot occur in the text.
    fn may_contain(&self, pat: &[u8]) -> bool {
        match pat {
            [] => true,
            [b] => self.bytes[*b as usize],
            _ => pat.windows(2).all(|w| {
                let i = (usize::from(w[0]) << 8) | usize::from(w[1]);
                self.pairs[i / 64] & (1 << (i % 64)) != 0
            }),
        }
    }
}

/// A fragment of input text after special-token partitioning.
enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

impl GgufTokenizer {
    /// Reads the GGUF header of `path` and builds the tokenizer from its metadata.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let content = read_gguf_content(path.as_ref())?;
        Self::from_content(&content)
    }

    /// Builds the tokenizer from an already-read GGUF header.
    pub fn from_content(content: &Content) -> Result<Self> {
        Self::from_metadata(&content.metadata)
    }

    /// Builds the tokenizer from GGUF metadata key/values.
    ///
    /// Requires `tokenizer.ggml.model` (`gpt2` or `llama`) and `tokenizer.ggml.tokens`;
    /// `tokenizer.ggml.token_type` defaults to all-normal.
    ///
    /// * `gpt2` also requires `tokenizer.ggml.merges`; `tokenizer.ggml.pre` defaults to `default`
    ///   (as in llama.cpp); `tokenizer.ggml.add_bos_token` defaults to false.
    /// * `llama` (SentencePiece) reads `tokenizer.ggml.scores` (all 0 when absent, as in
    ///   llama.cpp) and `tokenizer.ggml.add_space_prefix` (default true); BOS / EOS / unknown ids
    ///   default to llama.cpp's SPM defaults 1 / 2 / 0 and `add_bos_token` to true.
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let model = TokenizerModel::from_gguf_name(get_str(md, KEY_MODEL)?)?;
        let pre = match (model, md.get(KEY_PRE)) {
            (TokenizerModel::Spm, _) | (_, None) => PreTokenizerKind::Default,
            (_, Some(_)) => PreTokenizerKind::from_gguf_name(get_str(md, KEY_PRE)?)?,
        };

        // Token texts (llama.cpp replaces empty texts by "[EMPTY_i]").
        let texts: Vec<String> = get_str_array(md, KEY_TOKENS)?
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t.to_string()
                }
            })
            .collect();
        let n = texts.len();
        if n == 0 {
            return Err(bad(KEY_TOKENS, "the vocabulary is empty"));
        }
        if u32::try_from(n).is_err() {
            return Err(bad(KEY_TOKENS, "more than u32::MAX tokens"));
        }

        let mut attrs = match md.get(KEY_TOKEN_TYPE) {
            None => vec![TokenAttr::Normal; n],
            Some(Value::Array(items)) => {
                if items.len() < n {
                    return Err(bad(
                        KEY_TOKEN_TYPE,
                        format!("{} types for {n} tokens", items.len()),
                    ));
                }
                items[..n]
                    .iter()
                    .map(|v| {
                        value_as_i64(v)
                            .map(TokenAttr::from_gguf_type)
                            .ok_or_else(|| bad(KEY_TOKEN_TYPE, "expected integers"))
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            Some(_) => return Err(bad(KEY_TOKEN_TYPE, "expected an array")),
        };

        let mut vocab: HashMap<String, u32> = HashMap::with_capacity(n);
        for (i, t) in texts.iter().enumerate() {
            if vocab.insert(t.clone(), i as u32).is_some() {
                return Err(bad(KEY_TOKENS, format!("duplicate token text {t:?}")));
            }
        }

        // Special ids: explicit keys (llama.cpp's SPM defaults where absent or out of range),
        // then llama.cpp's text-based auto-detection.
        let spm_default =
            |id: u32| Some(id).filter(|&id| model == TokenizerModel::Spm && (id as usize) < n);
        let explicit = ExplicitSpecials {
            bos: opt_token_id(md, KEY_BOS, n)?.or_else(|| spm_default(1)),
            eos: opt_token_id(md, KEY_EOS, n)?.or_else(|| spm_default(2)),
            unk: opt_token_id(md, KEY_UNK, n)?.or_else(|| spm_default(0)),
            eot: opt_token_id(md, KEY_EOT, n)?,
            eom: opt_token_id(md, KEY_EOM, n)?,
            fim_pad: opt_token_id(md, KEY_FIM_PAD, n)?,
            fim_rep: opt_token_id(md, KEY_FIM_REP, n)?,
            fim_sep: opt_token_id(md, KEY_FIM_SEP, n)?,
            extra_eog: Vec::new(),
        };
        let Specials {
            bos,
            eos,
            unk,
            eog,
            special_order,
        } = resolve_specials(&texts, &mut attrs, explicit);

        let (backend, pieces, add_bos) = match model {
            TokenizerModel::Bpe => {
                let raw = build_bpe(md, pre, vocab)?;
                let pieces = byte_level_pieces(&texts, &attrs);
                let add_bos = matches!(md.get(KEY_ADD_BOS), Some(Value::Bool(true)));
                (Backend::Bpe(Box::new(raw)), pieces, add_bos)
            }
            TokenizerModel::Spm => {
                let scores = get_scores(md, n)?;
                let add_space_prefix = opt_bool(md, KEY_ADD_SPACE_PREFIX)?.unwrap_or(true);
                let add_bos = opt_bool(md, KEY_ADD_BOS)?.unwrap_or(true);
                let pieces = texts
                    .iter()
                    .zip(&attrs)
                    .map(|(t, &a)| spm_piece(t, a))
                    .collect();
                let spm = Spm::new(vocab, scores, unk, add_space_prefix);
                (Backend::Spm(Box::new(spm)), pieces, add_bos)
            }
        };

        Ok(Self {
            backend,
            pre,
            texts,
            attrs,
            pieces,
            special_order,
            bos,
            eos,
            unk,
            eog,
            add_bos,
        })
    }

    /// A byte-level BPE tokenizer from already-checked parts (the Hugging Face directory
    /// loader): `raw` is the BPE pipeline without added tokens or post-processor, `texts` /
    /// `attrs` cover every id (unique texts), `explicit` the special ids the source names.
    /// llama.cpp's special-token resolution is applied as for a GGUF.
    pub(crate) fn from_byte_level_parts(
        raw: Tokenizer,
        texts: Vec<String>,
        mut attrs: Vec<TokenAttr>,
        explicit: ExplicitSpecials,
        add_bos: bool,
    ) -> Self {
        let Specials {
            bos,
            eos,
            unk,
            eog,
            special_order,
        } = resolve_specials(&texts, &mut attrs, explicit);
        let pieces = byte_level_pieces(&texts, &attrs);
        Self {
            backend: Backend::Bpe(Box::new(raw)),
            pre: PreTokenizerKind::TokenizerJson,
            texts,
            attrs,
            pieces,
            special_order,
            bos,
            eos,
            unk,
            eog,
            add_bos,
        }
    }

    /// Number of tokens; valid ids are `0..vocab_size()`.
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// The tokenizer family (`tokenizer.ggml.model`).
    pub fn model(&self) -> TokenizerModel {
        match self.backend {
            Backend::Bpe(_) => TokenizerModel::Bpe,
            Backend::Spm(_) => TokenizerModel::Spm,
        }
    }

    /// The pre-tokenizer in use ([`PreTokenizerKind::Default`] for SentencePiece, which has
    /// none).
    pub fn pre_tokenizer(&self) -> PreTokenizerKind {
        self.pre
    }

    /// Whether SentencePiece prepends a space to a text fragment at the start of the input or
    /// after a special token (`tokenizer.ggml.add_space_prefix`); always false for BPE.
    pub fn add_space_prefix(&self) -> bool {
        match &self.backend {
            Backend::Bpe(_) => false,
            Backend::Spm(spm) => spm.add_space_prefix(),
        }
    }

    /// `tokenizer.ggml.bos_token_id`, if present and in range (SentencePiece: llama.cpp's
    /// default 1 otherwise).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// `tokenizer.ggml.eos_token_id`, if present and in range (SentencePiece: llama.cpp's
    /// default 2 otherwise).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// `tokenizer.ggml.unknown_token_id`, if present and in range (SentencePiece: llama.cpp's
    /// default 0 otherwise). SentencePiece encodes a byte with no byte token as this token.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }

    /// `tokenizer.ggml.add_bos_token` (when absent: false for BPE, true for SentencePiece, as
    /// llama.cpp). [`encode`](Self::encode) never adds a BOS itself; callers prepend
    /// [`bos_id`](Self::bos_id) when this is true.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos
    }

    /// The ids llama.cpp treats as end-of-generation (`llama_vocab_is_eog`), sorted ascending:
    /// EOS, EOT, EOM, the FIM pad/repo/separator tokens and tokens such as `<|im_end|>` and
    /// `<|endoftext|>`. Where llama.cpp picks among several candidate texts by hash-map order,
    /// this picks the lowest id.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether `id` ends generation (see [`eog_ids`](Self::eog_ids)).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// The token's text as stored in the GGUF (byte-level encoded for normal BPE tokens, spaces
    /// as `▁` for SentencePiece).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// The token's type.
    pub fn token_attr(&self, id: u32) -> Option<TokenAttr> {
        self.attrs.get(id as usize).copied()
    }

    /// Looks up a token by its exact stored text (the `[PAD{i}]` placeholders of unused ids
    /// past a Hugging Face tokenizer's end are not found).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        match &self.backend {
            // Added tokens of a `tokenizer.json` need not be in the BPE vocabulary.
            Backend::Bpe(raw) => raw.token_to_id(text).or_else(|| {
                self.special_order
                    .iter()
                    .copied()
                    .find(|&id| self.texts[id as usize] == text)
            }),
            Backend::Spm(spm) => spm.token_id(text),
        }
    }

    /// Raw bytes of one token (byte-level mapping undone, or SentencePiece's `▁` turned back into
    /// a space; byte tokens give their byte; control, unknown and user-defined tokens give their
    /// literal text; unused/undefined tokens give nothing). A single token may hold an
    /// incomplete UTF-8 sequence. No leading space is ever stripped.
    pub fn token_bytes(&self, id: u32) -> Result<&[u8]> {
        self.pieces
            .get(id as usize)
            .map(Vec::as_slice)
            .ok_or(ClientError::TokenOutOfRange {
                id,
                vocab: self.vocab_size(),
            })
    }

    /// Whether the token is a control or unknown token (what llama.cpp hides when detokenizing
    /// with `special = false`).
    pub fn is_control(&self, id: u32) -> bool {
        matches!(
            self.token_attr(id),
            Some(TokenAttr::Control | TokenAttr::Unknown)
        )
    }

    /// Tokenizes `text` exactly like llama.cpp's `llama_tokenize(text, add_special = false,
    /// parse_special)`.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        // SentencePiece: llama.cpp's `is_prev_special`, true at the start.
        let mut prev_special = true;
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(s) => match &self.backend {
                    Backend::Bpe(raw) => {
                        let enc = raw
                            .encode_fast(s, false)
                            .map_err(|e| ClientError::Tokenizer(e.to_string()))?;
                        out.extend_from_slice(enc.get_ids());
                    }
                    Backend::Spm(spm) => {
                        spm.encode_fragment(s, spm.add_space_prefix() && prev_special, &mut out)?;
                        prev_special = false;
                    }
                },
            }
        }
        Ok(out)
    }

    /// Concatenated raw bytes of `ids` (see [`token_bytes`](Self::token_bytes)).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id)?);
        }
        Ok(out)
    }

    /// Detokenizes `ids` (special tokens rendered as their text), replacing invalid UTF-8 with
    /// U+FFFD. For every string `s`, `decode(encode(s, _)) == s` with BPE; with SentencePiece
    /// too, unless `s` contains `▁` (encoded as a space), a byte without a byte token (encoded as
    /// the unknown token) or gets a space prefix (`add_space_prefix`, decoded as a leading
    /// space: llama.cpp's detokenizer strips it, this does not).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }

    /// Like [`decode`](Self::decode), but control/unknown tokens are dropped when
    /// `render_special` is false (llama.cpp's `special = false`). No space clean-up is applied.
    pub fn decode_with(&self, ids: &[u32], render_special: bool) -> Result<String> {
        let mut out = Vec::new();
        for &id in ids {
            let bytes = self.token_bytes(id)?;
            if render_special || !self.is_control(id) {
                out.extend_from_slice(bytes);
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The BPE + pre-tokenizer pipeline without special-token handling; `None` for
    /// SentencePiece (no `tokenizers` model reproduces llama.cpp's SPM).
    pub fn raw_tokenizer(&self) -> Option<&Tokenizer> {
        match &self.backend {
            Backend::Bpe(raw) => Some(raw),
            Backend::Spm(_) => None,
        }
    }

    /// A standalone `tokenizers::Tokenizer` with the special tokens registered as added tokens
    /// (control/unknown as special); `None` for SentencePiece. Its matching of overlapping
    /// special tokens is leftmost-longest (HF) rather than llama.cpp's longest-first;
    /// [`encode`](Self::encode) is the reference.
    pub fn hf_tokenizer(&self) -> Option<Tokenizer> {
        let mut tok = self.raw_tokenizer()?.clone();
        let added: Vec<AddedToken> = self
            .special_order
            .iter()
            .map(|&id| {
                let special = self.attrs[id as usize] != TokenAttr::UserDefined;
                AddedToken::from(self.texts[id as usize].clone(), special)
            })
            .collect();
        tok.add_special_tokens(&added);
        Some(tok)
    }

    /// llama.cpp's `tokenizer_st_partition` (without per-model lstrip/rstrip attributes).
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut frags = vec![Fragment::Text(text)];
        if text.is_empty() {
            return Vec::new();
        }
        // Vocabularies such as Gemma's hold thousands of special tokens: a cheap necessary
        // condition (every byte pair of the token occurs in the text) skips most of them.
        let pairs = BytePairs::new(text.as_bytes());
        for &id in &self.special_order {
            let attr = self.attrs[id as usize];
            if !parse_special && attr != TokenAttr::UserDefined {
                continue;
            }
            let pat = self.texts[id as usize].as_str();
            if !pairs.may_contain(pat.as_bytes())
                || !frags
                    .iter()
                    .any(|f| matches!(f, Fragment::Text(s) if s.contains(pat)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                match frag {
                    Fragment::Text(mut s) => {
                        while let Some(pos) = s.find(pat) {
                            if pos > 0 {
                                next.push(Fragment::Text(&s[..pos]));
                            }
                            next.push(Fragment::Token(id));
                            s = &s[pos + pat.len()..];
                        }
                        if !s.is_empty() {
                            next.push(Fragment::Text(s));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }
}
