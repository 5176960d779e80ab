//! SentencePiece (`tokenizer.ggml.model = "llama"`) against llama.cpp on the real Gemma 3 270M
//! GGUF, plus a tiny synthetic SPM vocabulary built from in-memory metadata.
//!
//! `tests/data/spm_golden_gemma3.json` is produced by `tests/data/make_spm_golden.py` (llama.cpp
//! through llama-cpp-python 0.3.36, `add_bos=False`, `special=True` and `special=False`). The
//! Gemma tests print SKIP when the model is absent unless `EQUICRYPT_REQUIRE_GEMMA3=1` or
//! `EQUICRYPT_REQUIRE_MODELS=1`; the model is `$EQUICRYPT_GEMMA3_GGUF`, else
//! `models/gemma3/gemma-3-270m-q4_k_m.gguf` in the workspace (`equicrypt fetch-model gemma3`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::quantized::gguf_file::Value;
use equicrypt_client::{
    ClientError, GgufTokenizer, PreTokenizerKind, StreamDecoder, TokenAttr, TokenizerModel,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    text: String,
    ids_special: Vec<u32>,
    ids_plain: Vec<u32>,
    detok_special_hex: String,
    detok_plain_hex: String,
}

#[derive(Deserialize)]
struct Piece {
    id: u32,
    hex: String,
}

#[derive(Deserialize)]
struct Golden {
    vocab_size: usize,
    bos_id: u32,
    eos_id: u32,
    add_bos: bool,
    eog_ids: Vec<u32>,
    pieces: Vec<Piece>,
    cases: Vec<Case>,
}

fn golden() -> &'static Golden {
    static G: OnceLock<Golden> = OnceLock::new();
    G.get_or_init(|| {
        // EQUICRYPT_SPM_GOLDEN points at another file made by the same script (fuzzing).
        let path = std::env::var("EQUICRYPT_SPM_GOLDEN").unwrap_or_else(|_| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/spm_golden_gemma3.json"
            )
            .to_string()
        });
        let text = std::fs::read_to_string(&path).expect("golden file");
        serde_json::from_str(&text).expect("golden json")
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The project's model policy (`$EQUICRYPT_GEMMA3_GGUF`, else `models/gemma3/…`; SKIP, or a
/// failure under `EQUICRYPT_REQUIRE_MODELS=1`), plus `EQUICRYPT_REQUIRE_GEMMA3=1` for this model
/// alone.
fn gemma3_path(test: &str) -> Option<PathBuf> {
    let path = equicrypt_test_support::gemma3(test);
    assert!(
        path.is_some() || !equicrypt_test_support::flag("EQUICRYPT_REQUIRE_GEMMA3"),
        "{test}: the Gemma 3 GGUF is required (EQUICRYPT_REQUIRE_GEMMA3=1) but absent"
    );
    path
}

/// The Gemma 3 tokenizer, loaded once per test binary.
fn gemma3(test: &str) -> Option<&'static GgufTokenizer> {
    static TOK: OnceLock<GgufTokenizer> = OnceLock::new();
    if let Some(t) = TOK.get() {
        return Some(t);
    }
    let path = gemma3_path(test)?;
    Some(TOK.get_or_init(|| {
        let start = Instant::now();
        let tok = GgufTokenizer::from_path(&path).expect("Gemma 3 tokenizer builds");
        eprintln!("Gemma 3 tokenizer loaded in {:?}", start.elapsed());
        tok
    }))
}

#[test]
fn gemma3_golden_ids_match_llama_cpp() {
    let Some(tok) = gemma3("gemma3_golden_ids_match_llama_cpp") else {
        return;
    };
    let g = golden();
    assert!(g.cases.len() >= 40);
    let mut failures = Vec::new();
    for case in &g.cases {
        for (special, want) in [(true, &case.ids_special), (false, &case.ids_plain)] {
            let ids = tok.encode(&case.text, special).unwrap();
            if &ids != want {
                failures.push(format!(
                    "{:?} (parse_special={special})\n  llama.cpp: {want:?}\n  ours:      {ids:?}",
                    case.text
                ));
            }
        }
    }
    eprintln!(
        "gemma3 golden: {}/{} match",
        2 * g.cases.len() - failures.len(),
        2 * g.cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn gemma3_decode_matches_llama_cpp_and_round_trips() {
    let Some(tok) = gemma3("gemma3_decode_matches_llama_cpp_and_round_trips") else {
        return;
    };
    for case in &golden().cases {
        let ids = &case.ids_special;
        assert_eq!(
            hex(&tok.decode_bytes(ids).unwrap()),
            case.detok_special_hex,
            "{:?}",
            case.text
        );
        assert_eq!(
            hex(tok.decode_with(ids, false).unwrap().as_bytes()),
            case.detok_plain_hex,
            "{:?}",
            case.text
        );
        // add_space_prefix is false: exact round trips, except that '▁' in the text is encoded
        // as (and decodes to) a space, as in llama.cpp.
        let want = case.text.replace('\u{2581}', " ");
        assert_eq!(tok.decode(ids).unwrap(), want);
        assert_eq!(tok.decode(&case.ids_plain).unwrap(), want);
        // Streaming reproduces the text too (byte tokens split characters).
        let mut s = StreamDecoder::new(tok);
        let mut out = String::new();
        for &id in ids {
            out.push_str(&s.push(id).unwrap());
        }
        out.push_str(&s.finish());
        assert_eq!(out, want);
    }
}

#[test]
fn gemma3_vocab_metadata_and_pieces() {
    let Some(tok) = gemma3("gemma3_vocab_metadata_and_pieces") else {
        return;
    };
    let g = golden();
    assert_eq!(tok.model(), TokenizerModel::Spm);
    assert_eq!(tok.vocab_size(), g.vocab_size);
    assert_eq!(tok.pre_tokenizer(), PreTokenizerKind::Default);
    assert_eq!(tok.bos_id(), Some(g.bos_id));
    assert_eq!(tok.eos_id(), Some(g.eos_id));
    assert_eq!(tok.unk_id(), Some(3));
    assert_eq!(tok.add_bos_token(), g.add_bos);
    assert!(!tok.add_space_prefix());
    assert_eq!(tok.eog_ids(), g.eog_ids.as_slice());
    assert!(tok.is_eog(106) && tok.token_text(106) == Some("<end_of_turn>"));
    assert_eq!(tok.token_id("<start_of_turn>"), Some(105));
    assert_eq!(tok.token_id("\u{2581}the"), Some(506));
    assert_eq!(tok.token_attr(248), Some(TokenAttr::Byte));
    // `</s>` is user-defined in the GGUF but llama.cpp marks it control (it is EOG).
    assert!(tok.is_control(212));
    assert!(tok.raw_tokenizer().is_none() && tok.hf_tokenizer().is_none());
    for p in &g.pieces {
        assert_eq!(
            hex(tok.token_bytes(p.id).unwrap()),
            p.hex,
            "piece of token {}",
            p.id
        );
    }
}

#[test]
fn gemma3_long_prose_is_fast() {
    let Some(tok) = gemma3("gemma3_long_prose_is_fast") else {
        return;
    };
    let case = golden().cases.iter().max_by_key(|c| c.text.len()).unwrap();
    assert!(case.ids_special.len() > 1000);
    let start = Instant::now();
    let rounds = 20;
    for _ in 0..rounds {
        assert_eq!(tok.encode(&case.text, true).unwrap(), case.ids_special);
    }
    let per = start.elapsed() / rounds;
    eprintln!(
        "encode of {} tokens: {per:?} per call",
        case.ids_special.len()
    );
    // Generous bound (shared 2-core CI machines); a quadratic rescan would be far slower.
    assert!(per.as_millis() < 200, "encode took {per:?}");
}

// --- tiny synthetic SPM vocabulary ----------------------------------------------------------

/// (text, score, GGUF type) of the tiny vocabulary; ids in order.
fn tiny_tokens() -> Vec<(String, f32, i32)> {
    let mut t: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
        ("<tool>".into(), 0.0, 4),
    ];
    // ids 4..260: byte tokens.
    t.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
    // ids 260..: pieces.
    for (text, score) in [
        ("\u{2581}", -1.0),
        ("a", -2.0),
        ("b", -3.0),
        ("c", -4.0),
        ("ab", -5.0),
        ("bc", -6.0),
        ("abc", -7.0),
        ("\u{2581}a", -8.0),
        ("\u{2581}ab", -9.0),
        ("\u{2581}\u{2581}", -10.0),
        ("é", -11.0),
    ] {
        t.push((text.into(), score, 1));
    }
    t
}

fn tiny_id(text: &str) -> u32 {
    tiny_tokens()
        .iter()
        .position(|(t, _, _)| t == text)
        .unwrap() as u32
}

fn byte(b: u8) -> u32 {
    4 + u32::from(b)
}

fn tiny_metadata() -> HashMap<String, Value> {
    let tokens = tiny_tokens();
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    md.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(
            tokens
                .iter()
                .map(|(t, _, _)| Value::String(t.clone()))
                .collect(),
        ),
    );
    md.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(tokens.iter().map(|(_, s, _)| Value::F32(*s)).collect()),
    );
    md.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(tokens.iter().map(|(_, _, ty)| Value::I32(*ty)).collect()),
    );
    md.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false));
    md
}

fn tiny(md: &HashMap<String, Value>) -> GgufTokenizer {
    GgufTokenizer::from_metadata(md).expect("tiny SPM vocab builds")
}

#[test]
fn tiny_spm_defaults_and_metadata() {
    let t = tiny(&tiny_metadata());
    assert_eq!(t.model(), TokenizerModel::Spm);
    assert_eq!(t.pre_tokenizer(), PreTokenizerKind::Default);
    // llama.cpp's SPM defaults: bos 1, eos 2, unk 0, add_bos true.
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.unk_id()),
        (Some(1), Some(2), Some(0))
    );
    assert!(t.add_bos_token());
    assert!(!t.add_space_prefix());
    assert_eq!(t.eog_ids(), &[2]);
    assert_eq!(t.token_bytes(tiny_id("\u{2581}ab")).unwrap(), b" ab");
    assert_eq!(t.token_bytes(byte(0xE2)).unwrap(), &[0xE2]);
    assert_eq!(t.token_bytes(1).unwrap(), b"<s>");
    assert_eq!(t.token_id("\u{2581}a"), Some(tiny_id("\u{2581}a")));
    assert!(t.raw_tokenizer().is_none());
}

#[test]
fn tiny_spm_merges_by_score() {
    let t = tiny(&tiny_metadata());
    let id = tiny_id;
    // "abc": "ab" (-5) merges before "bc" (-6), then "abc" (-7).
    assert_eq!(t.encode("abc", false).unwrap(), vec![id("abc")]);
    // " ab c": "▁a" (-8) loses to "ab" (-5); "▁" + "ab" → "▁ab" (-9).
    assert_eq!(
        t.encode(" ab c", false).unwrap(),
        vec![id("\u{2581}ab"), id("\u{2581}"), id("c")]
    );
    // The higher score wins a conflict: without the "abc" token, "abc" is ab + c, and with
    // "bc" scored above "ab" it is a + bc.
    let mut md = tiny_metadata();
    if let Some(Value::Array(tokens)) = md.get_mut("tokenizer.ggml.tokens") {
        tokens[id("abc") as usize] = Value::String("[no abc]".into());
    }
    assert_eq!(
        tiny(&md).encode("abc", false).unwrap(),
        vec![id("ab"), id("c")]
    );
    if let Some(Value::Array(scores)) = md.get_mut("tokenizer.ggml.scores") {
        scores[id("bc") as usize] = Value::F32(-1.5);
    }
    assert_eq!(
        tiny(&md).encode("abc", false).unwrap(),
        vec![id("a"), id("bc")]
    );
    // Ties: leftmost pair first ("▁▁▁" → "▁▁" + "▁").
    assert_eq!(
        t.encode("   ", false).unwrap(),
        vec![id("\u{2581}\u{2581}"), id("\u{2581}")]
    );
    // Integer scores are accepted, as llama.cpp does.
    let mut md = tiny_metadata();
    let n = tiny_tokens().len();
    md.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array((0..n).map(|i| Value::I32(-(i as i32))).collect()),
    );
    let t3 = tiny(&md);
    assert_eq!(t3.encode("abc", false).unwrap(), vec![id("abc")]);
}

#[test]
fn tiny_spm_byte_fallback_and_unknown() {
    let t = tiny(&tiny_metadata());
    // "é" is a token; "€" (E2 82 AC) is not: byte fallback.
    assert_eq!(
        t.encode("a€é", false).unwrap(),
        vec![
            tiny_id("a"),
            byte(0xE2),
            byte(0x82),
            byte(0xAC),
            tiny_id("é")
        ]
    );
    assert_eq!(
        t.decode(&t.encode("a€é x", false).unwrap()).unwrap(),
        "a€é x"
    );
    // Without byte tokens the unknown token stands for every byte.
    let mut md = tiny_metadata();
    if let Some(Value::Array(tokens)) = md.get_mut("tokenizer.ggml.tokens") {
        for (b, v) in tokens.iter_mut().skip(4).take(256).enumerate() {
            *v = Value::String(format!("[nobyte{b}]"));
        }
    }
    let t2 = tiny(&md);
    assert_eq!(t2.encode("a€", false).unwrap(), vec![tiny_id("a"), 0, 0, 0]);
    // The unknown token comes from the key; an out-of-range key falls back to llama.cpp's
    // default 0.
    md.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(3));
    let t3 = tiny(&md);
    assert_eq!(t3.unk_id(), Some(3));
    assert_eq!(t3.encode("a€", false).unwrap(), vec![tiny_id("a"), 3, 3, 3]);
    md.insert(
        "tokenizer.ggml.unknown_token_id".into(),
        Value::U32(u32::MAX),
    );
    assert_eq!(tiny(&md).unk_id(), Some(0));
}

#[test]
fn tiny_spm_special_tokens_and_space_prefix() {
    let id = tiny_id;
    let t = tiny(&tiny_metadata());
    // Control tokens only with parse_special; user-defined always.
    assert_eq!(
        t.encode("<s>ab<tool>c", true).unwrap(),
        vec![1, id("ab"), 3, id("c")]
    );
    let plain = t.encode("<s>ab", false).unwrap();
    assert_ne!(plain[0], 1);
    assert_eq!(t.decode(&plain).unwrap(), "<s>ab");
    assert_eq!(t.decode_with(&[1, id("ab"), 2], false).unwrap(), "ab");
    assert_eq!(
        t.decode_with(&[1, id("ab"), 3], true).unwrap(),
        "<s>ab<tool>"
    );

    // add_space_prefix (llama.cpp's SPM default): a space before the first fragment and every
    // fragment that follows a special token.
    let mut md = tiny_metadata();
    md.remove("tokenizer.ggml.add_space_prefix");
    let t = tiny(&md);
    assert!(t.add_space_prefix());
    assert_eq!(t.encode("ab", false).unwrap(), vec![id("\u{2581}ab")]);
    assert_eq!(
        t.encode("ab<s>ab<tool>ab", true).unwrap(),
        vec![id("\u{2581}ab"), 1, id("\u{2581}ab"), 3, id("\u{2581}ab")]
    );
    // The decoded text keeps that leading space (no stripping).
    assert_eq!(t.decode(&t.encode("ab", false).unwrap()).unwrap(), " ab");
    assert_eq!(t.encode("", true).unwrap(), Vec::<u32>::new());
}

#[test]
fn tiny_spm_bad_metadata_is_an_error() {
    let mut md = tiny_metadata();
    md.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(vec![Value::F32(0.0)]),
    );
    assert!(matches!(
        GgufTokenizer::from_metadata(&md),
        Err(ClientError::BadMetadata { key, .. }) if key == "tokenizer.ggml.scores"
    ));
    md.insert("tokenizer.ggml.scores".into(), Value::String("nope".into()));
    assert!(matches!(
        GgufTokenizer::from_metadata(&md),
        Err(ClientError::BadMetadata { key, .. }) if key == "tokenizer.ggml.scores"
    ));
    let mut md = tiny_metadata();
    md.insert("tokenizer.ggml.add_space_prefix".into(), Value::U32(1));
    assert!(matches!(
        GgufTokenizer::from_metadata(&md),
        Err(ClientError::BadMetadata { key, .. }) if key == "tokenizer.ggml.add_space_prefix"
    ));
    // Merges are not needed (nor read) for SPM; the tokens are.
    let mut md = tiny_metadata();
    md.remove("tokenizer.ggml.tokens");
    assert!(matches!(
        GgufTokenizer::from_metadata(&md),
        Err(ClientError::MissingKey(k)) if k == "tokenizer.ggml.tokens"
    ));
    // Missing scores: all 0 (llama.cpp), ties resolved leftmost: "ab" then "abc".
    let mut md = tiny_metadata();
    md.remove("tokenizer.ggml.scores");
    let t = tiny(&md);
    assert_eq!(t.encode("abc", false).unwrap(), vec![tiny_id("abc")]);
    assert_eq!(
        t.encode("bcab", false).unwrap(),
        vec![tiny_id("bc"), tiny_id("ab")]
    );
}
