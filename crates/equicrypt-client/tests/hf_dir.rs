//! The tokenizer and chat template built from a Hugging Face transformers checkpoint directory.
//!
//! * Against the real SmolLM2 (`models/smollm2-hf`, converted by transformers from
//!   `models/smollm2/…gguf`): the directory's tokenizer gives the same ids, decoded text, special
//!   ids, token table and chat-template rendering as the GGUF's (which matches llama.cpp, see
//!   `smollm2_golden.rs`); skipped when either model is absent unless
//!   `EQUICRYPT_REQUIRE_MODELS=1`.
//! * A tiny hand-written directory (always runs): padding past the tokenizer, added-token kinds,
//!   special ids from the three JSON files, template selection.
//! * Bad directories: a missing file, broken JSON, an encrypted checkpoint, an unsupported or
//!   inconsistent tokenizer — each a typed, one-line error naming the file.

mod common;

use std::path::{Path, PathBuf};

use equicrypt_client::{
    ChatMessage, ChatTemplate, CipherSession, ClientError, GgufTokenizer, PreTokenizerKind,
    TokenAttr, TokenizerModel, HF_ENCRYPTED_CONFIG_KEY,
};
use equicrypt_core::SecretKey;
use serde::Deserialize;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// SmolLM2: HF directory vs GGUF
// ---------------------------------------------------------------------------------------------

/// Both SmolLM2 tokenizers (GGUF, HF directory) and the directory, or `None` (SKIP).
fn smollm2_pair(test: &str) -> Option<(GgufTokenizer, GgufTokenizer, PathBuf, PathBuf)> {
    let gguf = equicrypt_test_support::smollm2(test)?;
    let dir = equicrypt_test_support::smollm2_hf(test)?;
    let g = GgufTokenizer::from_path(&gguf).expect("GGUF tokenizer builds");
    let h = GgufTokenizer::from_hf_dir(&dir).expect("HF-dir tokenizer builds");
    Some((g, h, gguf, dir))
}

/// A varied set: ASCII, Unicode scripts, emoji, code, whitespace runs, numbers (also non-ASCII
/// `\p{N}`), special tokens (alone, adjacent, nested in text, partial).
const TEXTS: &[&str] = &[
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'RE right, it's what WE'VE said; they'll've",
    "e-mail: someone@example.com, url: https://example.org/a?b=c&d=e#f",
    "Ñandú español, Français: déjà vu, Deutsch: Straße, Größe",
    "你好，世界！今天天气很好。",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "السلام عليكم ورحمة الله",
    "नमस्ते दुनिया",
    "ﬁ ligature, e\u{301} combining, \u{301}leading combining mark",
    "𠜎𠜱𠝹𠱓 (CJK Extension B)",
    "👩🏾\u{200d}💻 technologist 🎉🔥🚀 🏳️\u{200d}🌈 👍🏻",
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{x:?}\");\n}\n",
    "def f(x):\n\treturn x**2 // 3 % 4  # comment\n",
    "<div class=\"a\">&amp; &lt;tag&gt;</div>",
    "SELECT * FROM t WHERE a >= 10 AND b != 'x';",
    "a  b   c    d     e",
    "\n\n\n",
    "\t\t x\t",
    "   leading",
    "trailing   ",
    "  both  ",
    " \u{a0} nbsp \u{2003}em\u{2009}thin",
    "line\r\nbreaks\r\n\r\n",
    "12345 67890",
    "3.14159 1,000,000 2024-01-31 10:30",
    "½ ² ³ ٣ Ⅻ ① x² H₂O",
    " ½ and ²",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "<|im_start|><|im_end|><|endoftext|>",
    "<<|im_end|>>",
    "<|im_start|",
    "text<repo_name>name<file_sep>file<filename>a.rs<gh_stars>10",
    "<jupyter_code>x = 1<jupyter_output>1<empty_output>",
    "ĠċĊ byte-level lookalikes",
    "\u{378} unassigned, \u{fffd} replacement, \u{0} nul",
];

#[derive(Deserialize)]
struct GoldenCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Golden {
    cases: Vec<GoldenCase>,
}

/// The llama.cpp golden cases of `smollm2_golden.rs` (ids from llama.cpp itself).
fn golden_cases() -> Vec<GoldenCase> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/tokenizer_golden.json"
    );
    let g: Golden = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    g.cases
}

/// [`TEXTS`] and the llama.cpp golden texts.
fn all_texts(golden: &[GoldenCase]) -> Vec<&str> {
    TEXTS
        .iter()
        .copied()
        .chain(golden.iter().map(|c| c.text.as_str()))
        .collect()
}

/// Texts (with `parse_special`) on which the two tokenizers give different ids; asserts that
/// both decode every encoding back to the text, and to the same text where the ids agree.
fn differences(g: &GgufTokenizer, h: &GgufTokenizer, texts: &[&str]) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for text in texts {
        for parse_special in [true, false] {
            let a = g.encode(text, parse_special).unwrap();
            let b = h.encode(text, parse_special).unwrap();
            assert_eq!(
                h.decode(&b).unwrap(),
                *text,
                "HF-dir round trip of {text:?}"
            );
            assert_eq!(g.decode(&a).unwrap(), *text, "GGUF round trip of {text:?}");
            if a == b {
                assert_eq!(
                    g.decode_with(&a, false).unwrap(),
                    h.decode_with(&b, false).unwrap(),
                    "{text:?}"
                );
            } else {
                eprintln!("{text:?} (parse_special {parse_special})\n  gguf: {a:?}\n  hf:   {b:?}");
                out.push((text.to_string(), parse_special));
            }
        }
    }
    out
}

/// SmolLM2's GGUF pre-tokenizer is llama.cpp's `smollm` (every `\p{N}` split off alone, then
/// GPT-2's regex), as the original checkpoint's `Digits(individual_digits)` + `ByteLevel`;
/// `scripts/make_hf_checkpoint.py` restores the `Digits` step that transformers' GGUF converter
/// drops. The directory's tokenizer then gives llama.cpp's ids on every text (numbers next to
/// whitespace, `"  99  "`, `" ½"`, `"² ³"`, are where a fixture without the step differs).
#[test]
fn hf_dir_tokenizer_matches_gguf_ids_and_decode() {
    let Some((g, h, _, dir)) = smollm2_pair("hf_dir_tokenizer_matches_gguf_ids_and_decode") else {
        return;
    };
    let tj: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    assert!(
        tj["pre_tokenizer"].to_string().contains("Digits"),
        "models/smollm2-hf predates the digit-split fix: delete it and rerun \
         `equicrypt fetch-model smollm2-hf`"
    );
    let golden = golden_cases();
    let texts = all_texts(&golden);
    assert!(texts.len() >= 150, "{} texts compared", texts.len());
    let diff = differences(&g, &h, &texts);
    assert!(diff.is_empty(), "{} encodings differ: {diff:?}", diff.len());
    // The llama.cpp ids themselves.
    for c in &golden {
        assert_eq!(h.encode(&c.text, true).unwrap(), c.ids, "{:?}", c.text);
    }
    // Special tokens really were exercised both ways.
    let chat = "<|im_start|>user\nHi<|im_end|>";
    assert_eq!(h.encode(chat, true).unwrap(), g.encode(chat, true).unwrap());
    assert_eq!(h.encode(chat, true).unwrap()[0], 1);
    assert_eq!(h.encode(chat, true).unwrap().last(), Some(&2));
    assert!(!h.encode(chat, false).unwrap().contains(&1));
}

/// The directory's tokenizer is transformers' tokenizer of that directory: same ids on every
/// text (transformers `tok(text, add_special_tokens=False)`, which matches special tokens).
#[test]
fn hf_dir_tokenizer_matches_transformers() {
    let test = "hf_dir_tokenizer_matches_transformers";
    let Some(dir) = equicrypt_test_support::smollm2_hf(test) else {
        return;
    };
    let Some(python) = equicrypt_test_support::hf_python(test) else {
        return;
    };
    let h = GgufTokenizer::from_hf_dir(&dir).unwrap();
    let golden = golden_cases();
    let texts = all_texts(&golden);
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("texts.json");
    write_json(&input, &json!(texts));
    let script = "import json, sys\n\
        from transformers import AutoTokenizer\n\
        tok = AutoTokenizer.from_pretrained(sys.argv[1])\n\
        texts = json.load(open(sys.argv[2]))\n\
        print(json.dumps([tok(t, add_special_tokens=False)['input_ids'] for t in texts]))\n";
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(&dir)
        .arg(&input)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "transformers failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout.lines().last().expect("transformers printed ids");
    let expected: Vec<Vec<u32>> = serde_json::from_str(line).unwrap();
    assert_eq!(expected.len(), texts.len());
    let mut failures = Vec::new();
    for (text, want) in texts.iter().zip(&expected) {
        let got = h.encode(text, true).unwrap();
        if &got != want {
            failures.push(format!(
                "{text:?}\n  transformers: {want:?}\n  ours:         {got:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn hf_dir_token_table_and_special_ids_match_gguf() {
    let Some((g, h, _, _)) = smollm2_pair("hf_dir_token_table_and_special_ids_match_gguf") else {
        return;
    };
    assert_eq!(h.model(), TokenizerModel::Bpe);
    assert_eq!(h.pre_tokenizer(), PreTokenizerKind::TokenizerJson);
    assert_eq!(g.pre_tokenizer(), PreTokenizerKind::Smollm);
    assert_eq!(h.vocab_size(), 49152);
    assert_eq!(h.vocab_size(), g.vocab_size());
    assert_eq!(h.bos_id(), g.bos_id());
    assert_eq!(h.eos_id(), g.eos_id());
    assert_eq!(h.unk_id(), g.unk_id());
    assert_eq!(h.eog_ids(), g.eog_ids());
    assert_eq!(h.eog_ids(), &[0, 2, 4]);
    assert_eq!(h.add_bos_token(), g.add_bos_token());
    assert!(!h.add_bos_token());
    for id in 0..g.vocab_size() as u32 {
        assert_eq!(h.token_text(id), g.token_text(id), "text of {id}");
        assert_eq!(h.token_attr(id), g.token_attr(id), "type of {id}");
        assert_eq!(
            h.token_bytes(id).unwrap(),
            g.token_bytes(id).unwrap(),
            "bytes of {id}"
        );
        assert_eq!(h.is_eog(id), g.is_eog(id), "eog {id}");
    }
    assert_eq!(h.token_attr(1), Some(TokenAttr::Control));
    assert_eq!(h.token_id("<|im_end|>"), Some(2));
    assert!(h.token_bytes(49152).is_err());
    assert!(h.decode(&[49152]).is_err());

    // The same key gives the same cipher session (the permutation depends on the vocab size).
    let key = SecretKey::from_bytes([7; 32]);
    let sg = CipherSession::from_key(g, &key);
    let sh = CipherSession::from_key(h, &key);
    let text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n";
    let cipher = sh.encrypt_prompt(text, true).unwrap();
    assert_eq!(cipher, sg.encrypt_prompt(text, true).unwrap());
    assert_eq!(sh.eog_cipher_ids().unwrap(), sg.eog_cipher_ids().unwrap());
    assert_eq!(sh.decrypt_text(&cipher).unwrap(), text);
}

fn conversations() -> Vec<Vec<ChatMessage>> {
    vec![
        vec![ChatMessage::new("user", "What is the capital of France?")],
        vec![
            ChatMessage::new("system", "You are a pirate."),
            ChatMessage::new("user", "Hello"),
        ],
        vec![
            ChatMessage::new("user", "Write a haiku."),
            ChatMessage::new("assistant", "Leaves fall,\nsilent ponds 🍂"),
            ChatMessage::new("user", "Another, in français, with  two spaces."),
        ],
        vec![ChatMessage::new("user", "")],
    ]
}

#[test]
fn hf_dir_chat_template_renders_like_gguf() {
    let Some((g, h, gguf, dir)) = smollm2_pair("hf_dir_chat_template_renders_like_gguf") else {
        return;
    };
    let content = {
        let mut f = std::fs::File::open(&gguf).unwrap();
        candle_core::quantized::gguf_file::Content::read(&mut f).unwrap()
    };
    let tg = ChatTemplate::from_content(&content).unwrap();
    let th = ChatTemplate::from_hf_dir(&dir, &h)
        .unwrap()
        .expect("smollm2-hf has a chat template");
    for conv in conversations() {
        for gen in [true, false] {
            let a = tg.render(&conv, gen).unwrap();
            let b = th.render(&conv, gen).unwrap();
            assert_eq!(a, b, "{conv:?} (add_generation_prompt {gen})");
            assert_eq!(g.encode(&a, true).unwrap(), h.encode(&b, true).unwrap());
        }
    }
    // The rendering is the real thing, not two empty strings.
    let one = th.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
    assert!(one.starts_with("<|im_start|>system\n"), "{one:?}");
    assert!(one.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"));
}

// ---------------------------------------------------------------------------------------------
// A tiny hand-written directory
// ---------------------------------------------------------------------------------------------

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// Byte-level BPE: ids 0..256 the byte chars, 256.. the merge results `he`, `ll`, `hell`,
/// `hello`; added tokens 260 `<|im_start|>`, 261 `<|im_end|>`, 263 `<|eot|>` (special) and 262
/// `<tool>` (not special).
fn tiny_tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for (i, c) in common::byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    for (i, t) in ["he", "ll", "hell", "hello"].iter().enumerate() {
        vocab.insert((*t).to_string(), json!(256 + i));
    }
    let added = |id: u32, content: &str, special: bool| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": special})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            added(260, "<|im_start|>", true),
            added(261, "<|im_end|>", true),
            added(262, "<tool>", false),
            added(263, "<|eot|>", true),
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                          "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                           "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab,
                  "merges": [["h", "e"], ["l", "l"], ["he", "ll"], ["hell", "o"]]}
    })
}

const TINY_TEMPLATE: &str =
    "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}";

/// The tiny directory: vocab_size 272 (ids 264.. past the tokenizer), EOS 261 in config.json,
/// `[261, 263]` in generation_config.json, `add_bos_token`, a template list, and
/// `added_tokens_decoder` adding `<extra>` at 264.
fn tiny_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write_json(&d.path().join("tokenizer.json"), &tiny_tokenizer_json());
    write_json(
        &d.path().join("config.json"),
        &json!({"model_type": "llama", "vocab_size": 272, "bos_token_id": 260,
                "eos_token_id": 261}),
    );
    write_json(
        &d.path().join("generation_config.json"),
        &json!({"bos_token_id": 260, "eos_token_id": [261, 263]}),
    );
    write_json(
        &d.path().join("tokenizer_config.json"),
        &json!({
            "add_bos_token": true,
            "bos_token": "<|im_start|>",
            "eos_token": {"__type": "AddedToken", "content": "<|im_end|>"},
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": TINY_TEMPLATE},
            ],
            "added_tokens_decoder": {"264": {"content": "<extra>", "special": true}},
        }),
    );
    d
}

#[test]
fn tiny_hf_dir_pads_the_vocabulary_and_reads_special_ids() {
    let d = tiny_dir();
    let t = GgufTokenizer::from_hf_dir(d.path()).unwrap();
    assert_eq!(t.vocab_size(), 272);
    assert_eq!(t.bos_id(), Some(260));
    assert_eq!(t.eos_id(), Some(261));
    assert_eq!(t.eog_ids(), &[261, 263]);
    assert!(t.add_bos_token());
    assert_eq!(t.token_attr(259), Some(TokenAttr::Normal));
    assert_eq!(t.token_attr(260), Some(TokenAttr::Control));
    assert_eq!(t.token_attr(262), Some(TokenAttr::UserDefined));
    assert_eq!(t.token_attr(264), Some(TokenAttr::Control));
    assert_eq!(t.token_id("<extra>"), Some(264));
    for id in 265..272 {
        assert_eq!(t.token_attr(id), Some(TokenAttr::Unused));
        assert_eq!(t.token_bytes(id).unwrap(), b"");
        assert_eq!(t.token_text(id), Some(format!("[PAD{id}]").as_str()));
    }
    assert!(t.token_bytes(272).is_err());

    assert_eq!(t.encode("hello", false).unwrap(), vec![259]);
    assert_eq!(t.encode(" hello", false).unwrap(), vec![32, 259]);
    // Non-special added tokens are always matched, special ones only with parse_special.
    assert_eq!(
        t.encode("hello<tool>hello", false).unwrap(),
        vec![259, 262, 259]
    );
    assert_eq!(
        t.encode("<|im_start|>hello<extra>", true).unwrap(),
        vec![260, 259, 264]
    );
    let plain = t.encode("<|im_start|>hello", false).unwrap();
    assert!(!plain.contains(&260) && plain.len() > 2, "{plain:?}");
    assert_eq!(t.decode(&plain).unwrap(), "<|im_start|>hello");
    assert_eq!(
        t.decode(&[260, 259, 265, 261]).unwrap(),
        "<|im_start|>hello<|im_end|>"
    );
    assert_eq!(t.decode_with(&[260, 259, 261], false).unwrap(), "hello");

    // The template named "default" of the list, with the tokenizer_config token strings.
    let tmpl = ChatTemplate::from_hf_dir(d.path(), &t).unwrap().unwrap();
    assert_eq!(
        tmpl.render(&[ChatMessage::new("user", "hi")], false)
            .unwrap(),
        "<|im_start|>user: hi<|im_end|>"
    );
    // chat_template.jinja takes precedence over tokenizer_config.json.
    std::fs::write(d.path().join("chat_template.jinja"), "J{{ eos_token }}").unwrap();
    let tmpl = ChatTemplate::from_hf_dir(d.path(), &t).unwrap().unwrap();
    assert_eq!(tmpl.render(&[], false).unwrap(), "J<|im_end|>");
}

#[test]
fn tiny_hf_dir_without_tokenizer_config_uses_config_ids_and_post_processor() {
    let d = tiny_dir();
    std::fs::remove_file(d.path().join("tokenizer_config.json")).unwrap();
    std::fs::remove_file(d.path().join("generation_config.json")).unwrap();
    let mut tj = tiny_tokenizer_json();
    tj["post_processor"] = json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [260],
                                            "tokens": ["<|im_start|>"]}}
    });
    write_json(&d.path().join("tokenizer.json"), &tj);
    let t = GgufTokenizer::from_hf_dir(d.path()).unwrap();
    assert_eq!(t.bos_id(), Some(260));
    assert_eq!(t.eos_id(), Some(261));
    assert_eq!(t.eog_ids(), &[261]);
    assert!(
        t.add_bos_token(),
        "TemplateProcessing starting with a special token adds BOS"
    );
    // The post-processor is not applied by encode (callers add BOS).
    assert_eq!(t.encode("hello", false).unwrap(), vec![259]);
    assert_eq!(t.token_attr(264), Some(TokenAttr::Unused));
    assert!(ChatTemplate::from_hf_dir(d.path(), &t).unwrap().is_none());
}

// ---------------------------------------------------------------------------------------------
// Bad directories
// ---------------------------------------------------------------------------------------------

/// The error of building from `dir`, checked to be one line naming `names`.
fn tok_err(dir: &Path, names: &str) -> ClientError {
    let e = GgufTokenizer::from_hf_dir(dir).unwrap_err();
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "one line: {msg:?}");
    assert!(msg.contains(names), "{msg:?} should name {names:?}");
    e
}

#[test]
fn encrypted_key_is_the_models() {
    assert_eq!(HF_ENCRYPTED_CONFIG_KEY, equicrypt_model::hf::CONFIG_KEY);
}

#[test]
fn missing_files_are_named() {
    let d = tiny_dir();
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    let e = tok_err(d.path(), "tokenizer.json");
    assert!(matches!(e, ClientError::HfFileMissing { ref file, .. } if file == "tokenizer.json"));

    let d = tiny_dir();
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let e = tok_err(d.path(), "config.json");
    assert!(matches!(e, ClientError::HfFileMissing { ref file, .. } if file == "config.json"));

    let e = tok_err(
        Path::new("/nonexistent/checkpoint"),
        "/nonexistent/checkpoint",
    );
    assert!(matches!(e, ClientError::HfFileRead { .. }), "{e:?}");
}

#[test]
fn broken_json_is_named() {
    for file in [
        "tokenizer.json",
        "config.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        let d = tiny_dir();
        std::fs::write(d.path().join(file), "{\"vocab_size\": 272,\n  oops").unwrap();
        let path = d.path().join(file).display().to_string();
        let e = tok_err(d.path(), &path);
        assert!(matches!(e, ClientError::HfFileRead { .. }), "{file}: {e:?}");
        assert!(e.to_string().contains("not valid JSON"), "{e}");
    }
    // Valid JSON of the wrong shape.
    let d = tiny_dir();
    std::fs::write(d.path().join("config.json"), "[1, 2]").unwrap();
    let e = tok_err(d.path(), "config.json");
    assert!(matches!(e, ClientError::BadHfFile { .. }), "{e:?}");
    // A broken chat_template.json is the template's error, not a panic.
    let d = tiny_dir();
    std::fs::write(d.path().join("chat_template.json"), "nope").unwrap();
    let t = GgufTokenizer::from_hf_dir(d.path()).unwrap();
    let e = ChatTemplate::from_hf_dir(d.path(), &t).unwrap_err();
    assert!(e.to_string().contains("chat_template.json"), "{e}");
}

#[test]
fn encrypted_checkpoint_is_refused() {
    let d = tiny_dir();
    let path = d.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config[HF_ENCRYPTED_CONFIG_KEY] =
        json!({"format_version": 1, "key_fingerprint": "00", "mode": "exact"});
    write_json(&path, &config);
    let e = tok_err(d.path(), &d.path().display().to_string());
    assert!(
        matches!(e, ClientError::EncryptedHfCheckpoint { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("encrypted"), "{e}");
    // The template loader refuses it too (the tokenizer comes from elsewhere here).
    let other = tiny_dir();
    let t = GgufTokenizer::from_hf_dir(other.path()).unwrap();
    assert!(matches!(
        ChatTemplate::from_hf_dir(d.path(), &t),
        Err(ClientError::EncryptedHfCheckpoint { .. })
    ));
}

#[test]
fn inconsistent_or_unsupported_tokenizers_are_refused() {
    // vocab_size smaller than the tokenizer.
    let d = tiny_dir();
    write_json(&d.path().join("config.json"), &json!({"vocab_size": 100}));
    let e = tok_err(d.path(), "config.json");
    assert!(matches!(e, ClientError::BadHfFile { .. }), "{e:?}");
    assert!(e.to_string().contains("vocab_size 100"), "{e}");
    // No vocab_size.
    write_json(
        &d.path().join("config.json"),
        &json!({"model_type": "llama"}),
    );
    assert!(matches!(
        tok_err(d.path(), "config.json"),
        ClientError::BadHfFile { .. }
    ));
    // eos_token_id of the wrong type.
    write_json(
        &d.path().join("config.json"),
        &json!({"vocab_size": 272, "eos_token_id": "two"}),
    );
    let e = tok_err(d.path(), "config.json");
    assert!(e.to_string().contains("eos_token_id"), "{e}");
    // An added token past vocab_size.
    let d = tiny_dir();
    write_json(&d.path().join("config.json"), &json!({"vocab_size": 264}));
    let e = tok_err(d.path(), "tokenizer_config.json");
    assert!(e.to_string().contains("added token 264"), "{e}");
    // Not byte-level BPE: a WordLevel model, and BPE without a ByteLevel pre-tokenizer.
    let d = tiny_dir();
    let mut tj = tiny_tokenizer_json();
    tj["model"] = json!({"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": "[UNK]"});
    write_json(&d.path().join("tokenizer.json"), &tj);
    let e = tok_err(d.path(), "tokenizer.json");
    assert!(
        matches!(e, ClientError::UnsupportedHfTokenizer { .. }),
        "{e:?}"
    );
    let mut tj = tiny_tokenizer_json();
    tj["pre_tokenizer"] = json!({"type": "Whitespace"});
    write_json(&d.path().join("tokenizer.json"), &tj);
    let e = tok_err(d.path(), "tokenizer.json");
    assert!(
        matches!(e, ClientError::UnsupportedHfTokenizer { .. }),
        "{e:?}"
    );
    // Not a tokenizers tokenizer at all.
    write_json(&d.path().join("tokenizer.json"), &json!({"model": 5}));
    let e = tok_err(d.path(), "tokenizer.json");
    assert!(matches!(e, ClientError::BadHfFile { .. }), "{e:?}");
    // A duplicate token text.
    let d = tiny_dir();
    let mut tj = tiny_tokenizer_json();
    tj["added_tokens"][2]["content"] = json!("hello");
    write_json(&d.path().join("tokenizer.json"), &tj);
    let e = tok_err(d.path(), "tokenizer.json");
    assert!(e.to_string().contains("two ids"), "{e}");
    // A template list without a default.
    let d = tiny_dir();
    write_json(
        &d.path().join("tokenizer_config.json"),
        &json!({"chat_template": [{"name": "tool_use", "template": "T"}]}),
    );
    let t = GgufTokenizer::from_hf_dir(d.path()).unwrap();
    let e = ChatTemplate::from_hf_dir(d.path(), &t).unwrap_err();
    assert!(e.to_string().contains("no 'default'"), "{e}");
    // A template that does not compile names its file.
    std::fs::write(d.path().join("chat_template.jinja"), "{% for %}").unwrap();
    let e = ChatTemplate::from_hf_dir(d.path(), &t).unwrap_err();
    assert!(matches!(e, ClientError::Template(_)), "{e:?}");
    assert!(e.to_string().contains("chat_template.jinja"), "{e}");
    assert!(!e.to_string().contains('\n'), "{e}");
}
