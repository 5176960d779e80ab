//! Shared helpers: a tiny hand-made byte-level BPE vocabulary (the model path and SKIP policy
//! are in `equicrypt-test-support`).
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

/// Byte-level char of every byte (GPT-2 table).
pub fn byte_chars() -> Vec<char> {
    let mut out = Vec::with_capacity(256);
    let mut n = 0u32;
    for b in 0..=255u8 {
        if matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF) {
            out.push(char::from(b));
        } else {
            out.push(char::from_u32(256 + n).unwrap());
            n += 1;
        }
    }
    out
}

/// Special tokens of the tiny vocab: (text, GGUF type).
pub const SPECIALS: &[(&str, i32)] = &[
    ("<|endoftext|>", 3),
    ("<|im_start|>", 3),
    ("<|im_end|>", 3),
    ("<tool>", 4),
    ("<|im_start|>x", 3),
];

/// Merges of the tiny vocab (results are appended as tokens in this order).
pub const MERGES: &[(&str, &str)] = &[
    ("h", "e"),
    ("Ġ", "t"),
    ("Ġt", "he"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "Ġ"),
    ("1", "2"),
];

/// Metadata of the tiny vocab: specials at ids 0..5, then 256 byte tokens, then merge results.
pub fn tiny_metadata() -> HashMap<String, Value> {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|(t, _)| t.to_string()).collect();
    let mut types: Vec<Value> = SPECIALS.iter().map(|(_, t)| Value::I32(*t)).collect();
    for c in byte_chars() {
        tokens.push(c.to_string());
        types.push(Value::I32(1));
    }
    for (a, b) in MERGES {
        tokens.push(format!("{a}{b}"));
        types.push(Value::I32(1));
    }
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    md.insert("tokenizer.ggml.pre".into(), Value::String("smollm".into()));
    md.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    );
    md.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
    md.insert(
        "tokenizer.ggml.merges".into(),
        Value::Array(
            MERGES
                .iter()
                .map(|(a, b)| Value::String(format!("{a} {b}")))
                .collect(),
        ),
    );
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
    md.insert(
        "tokenizer.chat_template".into(),
        Value::String(SMOLLM2_TEMPLATE.into()),
    );
    md
}

/// Id of the byte token for `b` in the tiny vocab.
pub fn byte_id(b: u8) -> u32 {
    SPECIALS.len() as u32 + u32::from(b)
}

/// Id of the `i`-th merge result in the tiny vocab.
pub fn merge_id(i: usize) -> u32 {
    (SPECIALS.len() + 256 + i) as u32
}

/// SmolLM2-135M-Instruct's chat template, verbatim from its GGUF.
pub const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
