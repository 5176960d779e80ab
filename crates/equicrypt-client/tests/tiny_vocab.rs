//! Tokenizer, stream decoder, session and template tests on a tiny hand-made vocabulary
//! (no model file needed).

mod common;

use candle_core::quantized::gguf_file::Value;
use common::{byte_id, merge_id, tiny_metadata};
use equicrypt_client::{
    ChatMessage, ChatTemplate, CipherSession, ClientError, GgufTokenizer, PreTokenizerKind,
    StreamDecoder, TokenAttr,
};
use equicrypt_core::{CoreError, SecretKey, VocabPermutation};
use proptest::prelude::*;

fn tiny() -> GgufTokenizer {
    GgufTokenizer::from_metadata(&tiny_metadata()).expect("tiny vocab builds")
}

fn bytes_ids(s: &str) -> Vec<u32> {
    s.bytes().map(byte_id).collect()
}

#[test]
fn basic_properties() {
    let t = tiny();
    assert_eq!(t.vocab_size(), 5 + 256 + 8);
    assert_eq!(t.pre_tokenizer(), PreTokenizerKind::Smollm);
    assert_eq!(t.bos_id(), Some(1));
    assert_eq!(t.eos_id(), Some(2));
    // <|endoftext|> and <|im_end|> by text, eos = 2.
    assert_eq!(t.eog_ids(), &[0, 2]);
    assert!(t.is_eog(2) && !t.is_eog(1));
    assert_eq!(t.token_text(merge_id(5)), Some("hello"));
    assert_eq!(t.token_id("Ġthe"), Some(merge_id(2)));
    assert_eq!(t.token_attr(3), Some(TokenAttr::UserDefined));
    assert_eq!(t.token_attr(1), Some(TokenAttr::Control));
    assert!(!t.add_bos_token());
}

#[test]
fn encode_applies_merges_and_pretokenizer() {
    let t = tiny();
    assert_eq!(t.encode("hello", false).unwrap(), vec![merge_id(5)]);
    assert_eq!(t.encode(" the", false).unwrap(), vec![merge_id(2)]);
    assert_eq!(
        t.encode("hello the", false).unwrap(),
        vec![merge_id(5), merge_id(2)]
    );
    // smollm: every digit is its own piece, so the "1 2" merge never applies.
    assert_eq!(t.encode("12", false).unwrap(), bytes_ids("12"));
    // "  x": whitespace run before a non-space keeps its last space for the next word.
    assert_eq!(
        t.encode("   x", false).unwrap(),
        vec![merge_id(6), byte_id(b' '), byte_id(b'x')]
    );
    assert_eq!(t.encode("", true).unwrap(), Vec::<u32>::new());
}

#[test]
fn gpt2_pre_tokenizer_keeps_digit_runs() {
    let mut md = tiny_metadata();
    md.insert("tokenizer.ggml.pre".into(), Value::String("gpt-2".into()));
    let t = GgufTokenizer::from_metadata(&md).unwrap();
    assert_eq!(t.pre_tokenizer(), PreTokenizerKind::Gpt2);
    assert_eq!(t.encode("12", false).unwrap(), vec![merge_id(7)]);
}

#[test]
fn special_tokens_only_with_parse_special() {
    let t = tiny();
    assert_eq!(
        t.encode("<|im_start|>hello<|im_end|>", true).unwrap(),
        vec![1, merge_id(5), 2]
    );
    let plain = t.encode("<|im_start|>", false).unwrap();
    assert_eq!(plain.len(), "<|im_start|>".len());
    assert!(plain.iter().all(|&id| id >= 5));
    // Longest special text wins: "<|im_start|>x" (id 4) before "<|im_start|>" (id 1).
    assert_eq!(
        t.encode("<|im_start|>x<|im_start|>", true).unwrap(),
        vec![4, 1]
    );
}

#[test]
fn user_defined_tokens_always_match() {
    let t = tiny();
    assert_eq!(
        t.encode("<tool>hello", false).unwrap(),
        vec![3, merge_id(5)]
    );
    assert_eq!(t.encode("<tool>hello", true).unwrap(), vec![3, merge_id(5)]);
}

#[test]
fn decode_and_token_bytes() {
    let t = tiny();
    assert_eq!(t.token_bytes(byte_id(b' ')).unwrap(), b" ");
    assert_eq!(t.token_bytes(merge_id(2)).unwrap(), b" the");
    assert_eq!(t.token_bytes(1).unwrap(), b"<|im_start|>");
    assert_eq!(t.token_bytes(byte_id(0xE2)).unwrap(), &[0xE2]);
    let ids = t.encode("<|im_start|>hello the<|im_end|>", true).unwrap();
    assert_eq!(t.decode(&ids).unwrap(), "<|im_start|>hello the<|im_end|>");
    assert_eq!(t.decode_with(&ids, false).unwrap(), "hello the");
    // A lone continuation byte decodes lossily.
    assert_eq!(t.decode(&[byte_id(0x80)]).unwrap(), "\u{FFFD}");
}

#[test]
fn out_of_range_ids_are_errors() {
    let t = tiny();
    let n = t.vocab_size() as u32;
    assert!(matches!(
        t.token_bytes(n),
        Err(ClientError::TokenOutOfRange { id, vocab }) if id == n && vocab == n as usize
    ));
    assert!(t.decode(&[0, n]).is_err());
    assert_eq!(t.token_text(n), None);
    let mut s = StreamDecoder::new(&t);
    assert!(s.push(u32::MAX).is_err());
}

#[test]
fn metadata_errors_name_the_problem() {
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
    ] {
        let mut md = tiny_metadata();
        md.remove(key);
        match GgufTokenizer::from_metadata(&md) {
            Err(ClientError::MissingKey(k)) => assert_eq!(k, key),
            other => panic!("expected MissingKey({key}), got {other:?}"),
        }
    }

    let mut md = tiny_metadata();
    md.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
    let err = GgufTokenizer::from_metadata(&md).unwrap_err();
    assert!(matches!(&err, ClientError::UnsupportedTokenizerModel(m) if m == "bert"));
    assert!(err.to_string().contains("'bert'"));

    let mut md = tiny_metadata();
    md.insert("tokenizer.ggml.pre".into(), Value::String("qwen2".into()));
    let err = GgufTokenizer::from_metadata(&md).unwrap_err();
    assert!(matches!(&err, ClientError::UnsupportedPreTokenizer(p) if p == "qwen2"));
    assert!(err.to_string().contains("qwen2"));

    let mut md = tiny_metadata();
    md.insert("tokenizer.ggml.tokens".into(), Value::U32(3));
    assert!(matches!(
        GgufTokenizer::from_metadata(&md),
        Err(ClientError::BadMetadata { key, .. }) if key == "tokenizer.ggml.tokens"
    ));

    // A merge whose parts are not tokens.
    let mut md = tiny_metadata();
    md.insert(
        "tokenizer.ggml.merges".into(),
        Value::Array(vec![Value::String("zz qq".into())]),
    );
    assert!(matches!(
        GgufTokenizer::from_metadata(&md),
        Err(ClientError::Tokenizer(_))
    ));

    // Duplicate token texts.
    let mut md = tiny_metadata();
    if let Some(Value::Array(tokens)) = md.get_mut("tokenizer.ggml.tokens") {
        tokens[4] = Value::String("<|im_end|>".into());
    }
    assert!(matches!(
        GgufTokenizer::from_metadata(&md),
        Err(ClientError::BadMetadata { .. })
    ));

    assert!(matches!(
        GgufTokenizer::from_path("/nonexistent/model.gguf"),
        Err(ClientError::GgufRead { .. })
    ));
}

#[test]
fn missing_pre_falls_back_to_llama_cpp_default() {
    let mut md = tiny_metadata();
    md.remove("tokenizer.ggml.pre");
    let t = GgufTokenizer::from_metadata(&md).unwrap();
    assert_eq!(t.pre_tokenizer(), PreTokenizerKind::Default);
    // default: "[0-9][0-9][0-9]" splits, "12" stays one piece.
    assert_eq!(t.encode("12", false).unwrap(), vec![merge_id(7)]);
}

#[test]
fn hf_tokenizer_knows_special_tokens() {
    let t = tiny();
    let hf = t
        .hf_tokenizer()
        .expect("a BPE vocabulary has an HF tokenizer");
    let enc = hf.encode("<|im_start|>hello", false).unwrap();
    assert_eq!(enc.get_ids(), &[1, merge_id(5)]);
}

#[test]
fn stream_decoder_buffers_partial_chars() {
    let t = tiny();
    let mut s = StreamDecoder::new(&t);
    let euro = "€".as_bytes(); // E2 82 AC
    assert_eq!(s.push(byte_id(b'a')).unwrap(), "a");
    assert_eq!(s.push(byte_id(euro[0])).unwrap(), "");
    assert_eq!(s.push(byte_id(euro[1])).unwrap(), "");
    assert_eq!(s.pending_len(), 2);
    assert_eq!(s.push(byte_id(euro[2])).unwrap(), "€");
    // A truncated sequence followed by ASCII: U+FFFD then the ASCII char.
    assert_eq!(s.push(byte_id(0xE2)).unwrap(), "");
    assert_eq!(s.push(byte_id(b'b')).unwrap(), "\u{FFFD}b");
    assert_eq!(s.push(byte_id(0xF0)).unwrap(), "");
    assert_eq!(s.finish(), "\u{FFFD}");
    assert_eq!(s.finish(), "");
}

#[test]
fn stream_decoder_can_hide_control_tokens() {
    let t = tiny();
    let mut s = StreamDecoder::with_special(&t, false);
    assert_eq!(s.push(1).unwrap(), "");
    assert_eq!(s.push(merge_id(5)).unwrap(), "hello");
    assert_eq!(s.push(3).unwrap(), "<tool>");
}

fn key(seed: u8) -> SecretKey {
    SecretKey::from_bytes([seed; 32])
}

#[test]
fn cipher_session_roundtrip_and_errors() {
    let t = tiny();
    let n = t.vocab_size();
    let session = CipherSession::from_key(t.clone(), &key(7));
    let text = "<|im_start|>hello the 12 €<|im_end|>";
    let plain = t.encode(text, true).unwrap();
    let cipher = session.encrypt_prompt(text, true).unwrap();
    assert_eq!(cipher.len(), plain.len());
    assert_ne!(cipher, plain, "a random permutation should move some ids");
    assert_eq!(session.decrypt_ids(&cipher).unwrap(), plain);
    assert_eq!(session.decrypt_text(&cipher).unwrap(), text);

    let mut stream = session.decrypt_stream(true);
    let mut out = String::new();
    for &c in &cipher {
        out.push_str(&stream.push(c).unwrap());
    }
    out.push_str(&stream.finish());
    assert_eq!(out, text);

    let eog = session.eog_cipher_ids().unwrap();
    assert_eq!(eog.len(), 2);
    for &c in &eog {
        assert!(session.is_eog_cipher(c).unwrap());
    }

    // Out-of-range ciphertext ids are errors, never panics.
    let bad = n as u32;
    assert!(matches!(
        session.decrypt_ids(&[0, bad]),
        Err(ClientError::Core(CoreError::TokenOutOfRange { .. }))
    ));
    assert!(session.decrypt_text(&[u32::MAX]).is_err());
    assert!(session.is_eog_cipher(bad).is_err());
    assert!(stream.push(bad).is_err());
    let (id, _) = stream.push_with_id(cipher[0]).unwrap();
    assert_eq!(id, plain[0]);

    // Size mismatch between permutation and vocabulary.
    let perm = VocabPermutation::derive(&key(7), n + 1);
    assert!(matches!(
        CipherSession::new(t.clone(), perm),
        Err(ClientError::VocabMismatch { .. })
    ));
    let perm = VocabPermutation::derive(&key(7), n);
    assert!(CipherSession::new(t, perm).is_ok());
}

#[test]
fn chat_template_smollm2_exact_chatml() {
    let tmpl = ChatTemplate::from_metadata(&tiny_metadata()).unwrap();
    let out = tmpl
        .render(&[ChatMessage::new("user", "Hi")], true)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let out = tmpl
        .render(
            &[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi"),
                ChatMessage::new("assistant", "Hello!"),
            ],
            false,
        )
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    );
}

#[test]
fn chat_template_hf_compat_features() {
    // bos/eos strings, pycompat string methods, trim/lstrip blocks.
    let src = "{{ bos_token }}\n{% for m in messages %}\n  {% if m.role == 'user' %}\n{{ m.content.strip().upper() }}|{{ m['content'].startswith(' hi') }}\n  {% endif %}\n{% endfor %}\n{{ eos_token }}";
    let tmpl = ChatTemplate::new(src, "<s>", "</s>").unwrap();
    let out = tmpl
        .render(&[ChatMessage::new("user", " hi there ")], false)
        .unwrap();
    assert_eq!(out, "<s>\nHI THERE|True\n</s>");

    // raise_exception surfaces as a template error.
    let tmpl = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
    let err = tmpl.render(&[], false).unwrap_err();
    assert!(matches!(&err, ClientError::Template(m) if m.contains("roles must alternate")));

    // Python-style tojson: ", " / ": " separators, no ASCII or HTML escaping.
    let tmpl = ChatTemplate::new(
        "{{ messages[0] | tojson }}|{{ [1, 'a<b'] | tojson }}",
        "",
        "",
    )
    .unwrap();
    let out = tmpl
        .render(&[ChatMessage::new("user", "é\"x")], false)
        .unwrap();
    assert_eq!(out, r#"{"role": "user", "content": "é\"x"}|[1, "a<b"]"#);

    // Syntax errors are reported at construction.
    assert!(matches!(
        ChatTemplate::new("{% for %}", "", ""),
        Err(ClientError::Template(_))
    ));

    // Missing template key.
    let mut md = tiny_metadata();
    md.remove("tokenizer.chat_template");
    assert!(matches!(
        ChatTemplate::from_metadata(&md),
        Err(ClientError::MissingKey(k)) if k == "tokenizer.chat_template"
    ));

    // Extra context variables.
    let tmpl =
        ChatTemplate::new("{{ tools | length }}{{ add_generation_prompt }}", "", "").unwrap();
    let extra = minijinja::context! { tools => vec!["a", "b"] };
    assert_eq!(tmpl.render_with_extra(&[], true, extra).unwrap(), "2True");
}

fn id_strategy() -> impl Strategy<Value = u32> {
    let n = tiny().vocab_size() as u32;
    prop_oneof![
        // Mostly raw bytes (lots of broken UTF-8), sometimes specials or merges.
        6 => (0u32..256).prop_map(|b| byte_id(b as u8)),
        1 => 0u32..n,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(512) })]

    #[test]
    fn stream_decoding_equals_whole_decode(ids in prop::collection::vec(id_strategy(), 0..64)) {
        let t = tiny();
        let whole = t.decode(&ids).unwrap();
        let mut s = StreamDecoder::new(&t);
        let mut chunks = Vec::new();
        for &id in &ids {
            chunks.push(s.push(id).unwrap());
        }
        chunks.push(s.finish());
        prop_assert_eq!(chunks.concat(), whole.clone());
        // Every chunk is a complete UTF-8 string that lines up with char boundaries of `whole`.
        let mut offset = 0;
        for c in &chunks {
            prop_assert!(std::str::from_utf8(c.as_bytes()).is_ok());
            prop_assert!(whole.is_char_boundary(offset));
            offset += c.len();
        }
        prop_assert_eq!(offset, whole.len());
    }

    #[test]
    fn encode_decode_roundtrip(s in "(?s).{0,40}", special in any::<bool>()) {
        let t = tiny();
        let ids = t.encode(&s, special).unwrap();
        prop_assert_eq!(t.decode(&ids).unwrap(), s);
    }

    #[test]
    fn encode_decode_roundtrip_with_specials(
        parts in prop::collection::vec(
            prop_oneof![Just("<|im_start|>".to_string()), Just("<tool>".to_string()), "[a-z 0-9\n]{0,6}"],
            0..8,
        )
    ) {
        let t = tiny();
        let s = parts.concat();
        let ids = t.encode(&s, true).unwrap();
        prop_assert_eq!(t.decode(&ids).unwrap(), s);
    }
}
