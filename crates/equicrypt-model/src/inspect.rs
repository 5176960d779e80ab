//! `inspect`: a summary of a GGUF file and a leak check of what an encrypted file reveals.

use std::collections::BTreeMap;

use candle_core::quantized::gguf_file::Value;

use crate::encrypt::{placeholder_token, EncryptedModelInfo, META_FINGERPRINT};
use crate::gguf::GgufFile;

/// Summary of a model file.
#[derive(Clone, Debug)]
pub struct Inspection {
    /// `general.architecture`.
    pub architecture: String,
    /// Number of tensors.
    pub tensors: usize,
    /// Tensor count per storage type.
    pub dtypes: BTreeMap<String, usize>,
    /// Scalar metadata rendered as text (arrays summarised by length).
    pub metadata: BTreeMap<String, String>,
    /// Encryption details, if the file is encrypted.
    pub encrypted: Option<EncryptedModelInfo>,
    /// Findings of the leak check (empty = nothing found). Only meaningful for encrypted files.
    pub leaks: Vec<String>,
    /// Special-token ids named in the metadata ([`revealed_special_ids`]); empty when hidden.
    pub special_ids: Vec<(String, u64)>,
    /// `equicrypt.session` of a re-keyed session model.
    pub session: Option<String>,
}

fn render(v: &Value) -> String {
    match v {
        Value::String(s) if s.len() > 80 => format!(
            "\"{}…\" ({} bytes)",
            &s[..s.floor_char_boundary(60)],
            s.len()
        ),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("[{} items]", a.len()),
        Value::Bool(b) => b.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        other => other
            .to_u64()
            .map(|x| x.to_string())
            .or_else(|_| other.to_i64().map(|x| x.to_string()))
            .or_else(|_| other.to_u32().map(|x| x.to_string()))
            .or_else(|_| other.to_i32().map(|x| x.to_string()))
            .unwrap_or_else(|_| format!("{other:?}")),
    }
}

/// Inspects an opened GGUF file.
pub fn inspect(f: &GgufFile) -> Inspection {
    let mut dtypes = BTreeMap::new();
    for t in &f.tensors {
        *dtypes.entry(format!("{:?}", t.dtype)).or_insert(0) += 1;
    }
    let metadata = f
        .content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), render(v)))
        .collect();
    let encrypted = EncryptedModelInfo::read(f).ok();
    let leaks = if f.meta(META_FINGERPRINT).is_some() {
        leak_check(f)
    } else {
        Vec::new()
    };
    Inspection {
        architecture: f
            .meta_str("general.architecture")
            .unwrap_or("?")
            .to_string(),
        tensors: f.tensors.len(),
        dtypes,
        metadata,
        encrypted,
        leaks,
        special_ids: revealed_special_ids(f),
        session: crate::rekey::session_label(f),
    }
}

/// Lists everything in an encrypted file that could reveal plaintext vocabulary or identity.
pub fn leak_check(f: &GgufFile) -> Vec<String> {
    let mut found = Vec::new();
    for key in [
        "tokenizer.ggml.merges",
        "tokenizer.chat_template",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "general.basename",
        "general.finetune",
        "general.organization",
        "general.size_label",
    ] {
        if f.meta(key).is_some() {
            found.push(format!("metadata '{key}' is present"));
        }
    }
    if let Some(Value::Array(tokens)) = f.meta("tokenizer.ggml.tokens") {
        let bad = tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| !matches!(t, Value::String(s) if *s == placeholder_token(*i)))
            .count();
        if bad > 0 {
            found.push(format!("{bad} token strings are not opaque placeholders"));
        }
    }
    if let Some(Value::Array(types)) = f.meta("tokenizer.ggml.token_type") {
        let special = types.iter().filter(|t| t.to_i32().ok() != Some(1)).count();
        if special > 0 {
            found.push(format!(
                "{special} tokens are marked with a non-normal type"
            ));
        }
    }
    if let Some(Value::Array(scores)) = f.meta("tokenizer.ggml.scores") {
        if scores.iter().any(|s| s.to_f32().ok() != Some(0.0)) {
            found.push("token scores are not all zero".into());
        }
    }
    found
}

/// Metadata keys that hold token ids (ciphertext ids in an encrypted file).
pub(crate) const TOKEN_ID_KEYS: [&str; 6] = [
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.seperator_token_id",
    "tokenizer.ggml.eot_token_id",
];

/// Which special-token ids an encrypted file names in its metadata (ciphertext ids of an
/// encrypted file): `(metadata key, id)` pairs; empty when they are hidden
/// (`encrypt --hide-special-ids`).
pub fn revealed_special_ids(f: &GgufFile) -> Vec<(String, u64)> {
    TOKEN_ID_KEYS
        .iter()
        .filter_map(|k| f.meta_u64(k).ok().map(|v| (k.to_string(), v)))
        .collect()
}
