//! Golden tests against llama.cpp on the real SmolLM2-135M-Instruct GGUF.
//!
//! `tests/data/tokenizer_golden.json` is produced by `scripts/gen_tokenizer_golden.py` (llama.cpp
//! through llama-cpp-python, `add_bos=False, special=True`). The tests skip when the model is
//! absent unless `EQUICRYPT_REQUIRE_MODELS=1`.

mod common;

use equicrypt_client::{
    ChatMessage, ChatTemplate, CipherSession, GgufTokenizer, PreTokenizerKind, StreamDecoder,
};
use equicrypt_core::SecretKey;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
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
    eog_ids: Vec<u32>,
    pieces: Vec<Piece>,
    cases: Vec<Case>,
}

fn golden() -> Golden {
    // EQUICRYPT_TOKENIZER_GOLDEN points at another file made by the same script (fuzzing).
    let path = std::env::var("EQUICRYPT_TOKENIZER_GOLDEN").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/tokenizer_golden.json"
        )
        .to_string()
    });
    let text = std::fs::read_to_string(&path).expect("golden file");
    serde_json::from_str(&text).expect("golden json")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn load(test: &str) -> Option<GgufTokenizer> {
    let path = equicrypt_test_support::smollm2(test)?;
    Some(GgufTokenizer::from_path(path).expect("SmolLM2 tokenizer builds"))
}

#[test]
fn golden_tokenization_matches_llama_cpp() {
    let Some(tok) = load("golden_tokenization_matches_llama_cpp") else {
        return;
    };
    let g = golden();
    assert!(g.cases.len() >= 120);
    let mut failures = Vec::new();
    for case in &g.cases {
        let ids = tok.encode(&case.text, true).unwrap();
        if ids != case.ids {
            failures.push(format!(
                "{:?}\n  llama.cpp: {:?}\n  ours:      {:?}",
                case.text, case.ids, ids
            ));
        }
    }
    let matched = g.cases.len() - failures.len();
    eprintln!("golden tokenization: {matched}/{} match", g.cases.len());
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn golden_roundtrip_decode_encode() {
    let Some(tok) = load("golden_roundtrip_decode_encode") else {
        return;
    };
    for case in &golden().cases {
        for special in [true, false] {
            let ids = tok.encode(&case.text, special).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), case.text, "special={special}");
        }
        // Streaming the golden ids reproduces the text too.
        let mut s = StreamDecoder::new(&tok);
        let mut out = String::new();
        for &id in &case.ids {
            out.push_str(&s.push(id).unwrap());
        }
        out.push_str(&s.finish());
        assert_eq!(out, case.text);
    }
}

#[test]
fn golden_vocab_metadata_and_pieces() {
    let Some(tok) = load("golden_vocab_metadata_and_pieces") else {
        return;
    };
    let g = golden();
    assert_eq!(tok.vocab_size(), g.vocab_size);
    assert_eq!(tok.pre_tokenizer(), PreTokenizerKind::Smollm);
    assert_eq!(tok.bos_id(), Some(g.bos_id));
    assert_eq!(tok.eos_id(), Some(g.eos_id));
    assert_eq!(tok.eog_ids(), g.eog_ids.as_slice());
    assert_eq!(tok.token_text(2), Some("<|im_end|>"));
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
fn smollm2_chat_template_renders_chatml() {
    let Some(path) = equicrypt_test_support::smollm2("smollm2_chat_template_renders_chatml") else {
        return;
    };
    let content = {
        let mut f = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
        candle_core::quantized::gguf_file::Content::read(&mut f).unwrap()
    };
    let tmpl = ChatTemplate::from_content(&content).unwrap();
    let prompt = tmpl
        .render(&[ChatMessage::new("user", "Hi")], true)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // The same header serves the tokenizer (CLI reuse), and the prompt tokenizes with specials.
    let tok = GgufTokenizer::from_content(&content).unwrap();
    let ids = tok.encode(&prompt, true).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(*ids.last().unwrap(), 198); // "\n"
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2);

    let session = CipherSession::from_key(tok, &SecretKey::from_bytes([3; 32]));
    let cipher = session.encrypt_prompt(&prompt, true).unwrap();
    assert_eq!(session.decrypt_text(&cipher).unwrap(), prompt);
}
