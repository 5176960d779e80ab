//! Per-session vocabulary re-keying of an encrypted model.
//!
//! A session `s` (a non-secret label) gets its own vocabulary permutation on top of the file's:
//! session ciphertext id = `σ_s(π(p))`, with `σ_s` derived from the key and the label
//! ([`VocabPermutation::derive_session_rekey`]; the client's composed map is
//! [`VocabPermutation::derive_session`]). Only the rows of `token_embd.weight` (and of
//! `output.weight` when the head is untied) move, by `σ_s`, as byte copies: lossless for every
//! block format. Every other tensor is shared, so a server can hold one model body and one small
//! table per session ([`BaseVocabTables::rekey`] builds those tables in memory), or a complete
//! session file can be written ([`rekey_gguf`]).
//!
//! A session model file is the base file with the vocabulary tensors replaced, BOS/EOS metadata
//! ids (if stored) mapped through `σ_s`, and [`META_SESSION`] = the label. The label is not
//! secret — the derivation is keyed by the secret key, and a server that holds several session
//! tables must know which is which anyway — but it is visible to whoever holds the file, so it
//! should not carry private information. Storing it lets the key holder see which session a
//! file belongs to (`equicrypt inspect`). The key fingerprint stays the base model's.
//!
//! Re-keying an already re-keyed file is refused ([`ModelError::AlreadyRekeyed`]): the result
//! would be `σ_t ∘ σ_s ∘ π`, which no session label derives. Re-key the base encrypted file.
//!
//! What re-keying protects: id statistics collected in one session (frequency analysis, known
//! positions of chat-template tokens) do not transfer to another session's ids. It does not help
//! against a server that holds the public base weights (the vocabulary attack of the attack lab
//! recovers `σ_s ∘ π` exactly as it recovers `π`).

use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file::Value;
use equicrypt_core::{KeyFingerprint, Permutation, SecretKey, TensorTransform, VocabPermutation};

use crate::encrypt::EncryptedModelInfo;
use crate::gguf::{GgufFile, GgufWriter, TensorEntry};
use crate::inspect::TOKEN_ID_KEYS;
use crate::quant::{transform_tensor, BlockFormat};
use crate::ModelError;

/// Metadata key holding the session label of a re-keyed model.
pub const META_SESSION: &str = "equicrypt.session";

/// Tensors whose rows are indexed by vocabulary id.
pub const VOCAB_TENSORS: [&str; 2] = ["token_embd.weight", "output.weight"];

/// The session label of a re-keyed model, if the file is one.
pub fn session_label(f: &GgufFile) -> Option<String> {
    match f.meta(META_SESSION) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    }
}

/// The vocabulary tensors of a base encrypted model, read once, from which any number of session
/// tables are built.
pub struct BaseVocabTables {
    tensors: Vec<(TensorEntry, Vec<u8>)>,
    vocab: usize,
    fingerprint: KeyFingerprint,
}

impl std::fmt::Debug for BaseVocabTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseVocabTables")
            .field("tensors", &self.tensors.len())
            .field("vocab", &self.vocab)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// The re-keyed vocabulary tensors of one session, in file order.
#[derive(Clone)]
pub struct SessionTables {
    /// The session label.
    pub label: String,
    /// `(tensor name, raw GGUF bytes)` of `token_embd.weight` and, for an untied head,
    /// `output.weight`.
    pub tensors: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for SessionTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The bytes are derived from the key: never print them.
        f.debug_struct("SessionTables")
            .field("label", &self.label)
            .field("tensors", &self.tensors.len())
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl SessionTables {
    /// Bytes held by the tables (the per-session memory of a server sharing the model body).
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|(_, d)| d.len() as u64).sum()
    }

    /// The bytes of tensor `name`, if it is one of the tables.
    pub fn tensor(&self, name: &str) -> Option<&[u8]> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.as_slice())
    }
}

impl BaseVocabTables {
    /// Reads the vocabulary tensors of the base encrypted model `f` after checking that `key` is
    /// its key and that it is not a session model already.
    pub fn read(f: &mut GgufFile, key: &SecretKey) -> Result<Self, ModelError> {
        let info = EncryptedModelInfo::read(f)?;
        info.check_key(key)?;
        if let Some(session) = session_label(f) {
            return Err(ModelError::AlreadyRekeyed {
                path: f.path().display().to_string(),
                session,
            });
        }
        let emb = f.tensor(VOCAB_TENSORS[0])?.clone();
        let (vocab, _) = emb.rows_cols();
        let mut tensors = Vec::new();
        for t in f.tensors.clone() {
            if !VOCAB_TENSORS.contains(&t.name.as_str()) {
                continue;
            }
            let (rows, _) = t.rows_cols();
            if rows != vocab {
                return Err(ModelError::ShapeMismatch(format!(
                    "{} has {rows} rows but the vocabulary has {vocab} ids",
                    t.name
                )));
            }
            BlockFormat::of(t.dtype).map_err(|e| e.in_tensor(&t.name))?;
            let data = f.read_tensor(&t)?;
            tensors.push((t, data));
        }
        Ok(Self {
            tensors,
            vocab,
            fingerprint: info.fingerprint,
        })
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Bytes of the base tables.
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|(_, d)| d.len() as u64).sum()
    }

    /// The tables of session `label`: the base rows moved by `σ_s` (row `c` goes to `σ_s(c)`).
    pub fn rekey(&self, key: &SecretKey, label: &str) -> Result<SessionTables, ModelError> {
        if key.fingerprint() != self.fingerprint {
            return Err(ModelError::WrongKey {
                model: self.fingerprint.0.clone(),
                key: key.fingerprint().0,
            });
        }
        let sigma = VocabPermutation::derive_session_rekey(key, label, self.vocab)?;
        self.apply(&sigma, label)
    }

    fn apply(&self, sigma: &Permutation, label: &str) -> Result<SessionTables, ModelError> {
        let tr = TensorTransform {
            rows: Some(sigma.clone()),
            ..Default::default()
        };
        let mut tensors = Vec::with_capacity(self.tensors.len());
        for (t, data) in &self.tensors {
            let (rows, cols) = t.rows_cols();
            let out = transform_tensor(data, t.dtype, rows, cols, &tr)
                .map_err(|e| e.in_tensor(&t.name))?;
            tensors.push((t.name.clone(), out));
        }
        Ok(SessionTables {
            label: label.to_string(),
            tensors,
        })
    }
}

/// The session tables of `label` for the base encrypted model at `encrypted`.
pub fn session_tables(
    encrypted: &Path,
    key: &SecretKey,
    label: &str,
) -> Result<SessionTables, ModelError> {
    equicrypt_core::validate_session_label(label)?;
    let mut f = GgufFile::open(encrypted)?;
    BaseVocabTables::read(&mut f, key)?.rekey(key, label)
}

/// What [`rekey_gguf`] did.
#[derive(Clone, Debug)]
pub struct RekeyReport {
    /// Number of tensors written.
    pub tensors: usize,
    /// Bytes of the per-session tables (the re-keyed vocabulary tensors).
    pub table_bytes: u64,
    /// Size of the written file.
    pub file_bytes: u64,
    /// Seconds spent deriving `σ_s` and moving the rows.
    pub table_seconds: f64,
    /// Wall time of the whole re-key, in seconds.
    pub seconds: f64,
    /// Fingerprint of the key (unchanged by re-keying).
    pub fingerprint: KeyFingerprint,
}

/// Writes the session model of `label` for the base encrypted model `encrypted_in` to `out`:
/// vocabulary tensors re-keyed, every other tensor copied verbatim, token-id metadata mapped
/// through `σ_s`, and [`META_SESSION`] set. Atomic (temporary file + rename); refuses an existing
/// `out` unless `overwrite`, a wrong key, and an already re-keyed input.
pub fn rekey_gguf(
    encrypted_in: &Path,
    key: &SecretKey,
    label: &str,
    out: &Path,
    overwrite: bool,
) -> Result<RekeyReport, ModelError> {
    let start = Instant::now();
    equicrypt_core::validate_session_label(label)?;
    if out.exists() && !overwrite {
        return Err(ModelError::OutputExists(out.display().to_string()));
    }
    if let (Ok(a), Ok(b)) = (encrypted_in.canonicalize(), out.canonicalize()) {
        if a == b {
            return Err(ModelError::OutputExists(out.display().to_string()));
        }
    }
    let mut f = GgufFile::open(encrypted_in)?;
    let base = BaseVocabTables::read(&mut f, key)?;
    let t0 = Instant::now();
    let sigma = VocabPermutation::derive_session_rekey(key, label, base.vocab())?;
    let mut tables = base.apply(&sigma, label)?;
    let table_seconds = t0.elapsed().as_secs_f64();
    drop(base);

    let meta = session_metadata(&f, &sigma, label)?;
    let headers = crate::source::TensorSource::tensor_infos(&f);
    let mut writer = GgufWriter::create(out, &meta, headers)?;
    let table_bytes = tables.bytes();
    for t in f.tensors.clone() {
        match tables.tensors.iter_mut().find(|(n, _)| *n == t.name) {
            Some((_, data)) => {
                let data = std::mem::take(data);
                writer.write_tensor(&t.name, &data)?;
            }
            None => {
                let data = f.read_tensor(&t)?;
                writer.write_tensor(&t.name, &data)?;
            }
        }
    }
    writer.finish()?;
    let file_bytes = std::fs::metadata(out)
        .map_err(|e| ModelError::io(out, e))?
        .len();
    Ok(RekeyReport {
        tensors: f.tensors.len(),
        table_bytes,
        file_bytes,
        table_seconds,
        seconds: start.elapsed().as_secs_f64(),
        fingerprint: key.fingerprint(),
    })
}

/// The base file's metadata with token ids mapped through `σ_s` and the session label added;
/// `general.architecture` first, the rest sorted by key (deterministic output).
fn session_metadata(
    f: &GgufFile,
    sigma: &Permutation,
    label: &str,
) -> Result<Vec<(String, Value)>, ModelError> {
    let mut meta: Vec<(String, Value)> = Vec::with_capacity(f.content.metadata.len() + 1);
    for (k, v) in &f.content.metadata {
        let v = if TOKEN_ID_KEYS.contains(&k.as_str()) {
            let id = f.meta_u64(k)?;
            let id = u32::try_from(id)
                .ok()
                .filter(|&i| (i as usize) < sigma.len())
                .ok_or_else(|| {
                    ModelError::Metadata(format!(
                        "'{k}' = {id} is outside the vocabulary (size {})",
                        sigma.len()
                    ))
                })?;
            Value::U32(sigma.apply(id))
        } else {
            v.clone()
        };
        meta.push((k.clone(), v));
    }
    meta.push((META_SESSION.into(), Value::String(label.to_string())));
    meta.sort_by(|a, b| {
        let first = |k: &str| k != "general.architecture";
        (first(&a.0), &a.0).cmp(&(first(&b.0), &b.0))
    });
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encrypt::{encrypt_gguf, EncryptOptions};
    use crate::synthetic::SyntheticLlama;
    use candle_core::quantized::GgmlDType;

    fn model(embed: GgmlDType, untied: bool) -> SyntheticLlama {
        let mut m = SyntheticLlama::tiny_f32(11);
        m.matrix_dtype = GgmlDType::Q4_1;
        m.embed_dtype = embed;
        m.untied_head = untied;
        m
    }

    fn bytes_of(f: &mut GgufFile, name: &str) -> Vec<u8> {
        let t = f.tensor(name).unwrap().clone();
        f.read_tensor(&t).unwrap()
    }

    #[test]
    fn session_rows_are_base_rows_moved_and_the_rest_is_identical() {
        let key = SecretKey::from_bytes([3; 32]);
        for (dtype, untied) in [
            (GgmlDType::F32, false),
            (GgmlDType::Q4_1, true),
            (GgmlDType::Q8_0, true),
            (GgmlDType::Q5_0, false),
            (GgmlDType::F16, true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (p, e, s) = (
                dir.path().join("p.gguf"),
                dir.path().join("e.gguf"),
                dir.path().join("s.gguf"),
            );
            model(dtype, untied).write(&p).unwrap();
            encrypt_gguf(&key, &p, &e, &EncryptOptions::default()).unwrap();
            let r = rekey_gguf(&e, &key, "alice", &s, false).unwrap();
            let mut fe = GgufFile::open(&e).unwrap();
            let mut fs = GgufFile::open(&s).unwrap();
            assert_eq!(session_label(&fs).as_deref(), Some("alice"));
            assert_eq!(fe.tensors.len(), fs.tensors.len());
            let vocab = fe.tensor("token_embd.weight").unwrap().rows_cols().0;
            let sigma = VocabPermutation::derive_session_rekey(&key, "alice", vocab).unwrap();
            let mut table_bytes = 0;
            for t in fe.tensors.clone() {
                let a = bytes_of(&mut fe, &t.name);
                let b = bytes_of(&mut fs, &t.name);
                assert_eq!(fs.tensor(&t.name).unwrap().dims, t.dims);
                if VOCAB_TENSORS.contains(&t.name.as_str()) {
                    table_bytes += a.len() as u64;
                    let rb = a.len() / vocab;
                    for c in 0..vocab {
                        let d = sigma.apply(c as u32) as usize;
                        assert_eq!(a[c * rb..(c + 1) * rb], b[d * rb..(d + 1) * rb]);
                    }
                    assert_ne!(a, b);
                } else {
                    assert_eq!(a, b, "{} must be copied verbatim", t.name);
                }
            }
            assert_eq!(r.table_bytes, table_bytes);
            assert_eq!(r.file_bytes, std::fs::metadata(&s).unwrap().len());
            // BOS/EOS follow σ_s; everything else in the metadata is unchanged.
            for k in ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"] {
                let a = fe.meta_u64(k).unwrap() as u32;
                assert_eq!(fs.meta_u64(k).unwrap() as u32, sigma.apply(a));
            }
            for (k, v) in &fe.content.metadata {
                if !TOKEN_ID_KEYS.contains(&k.as_str()) {
                    assert_eq!(
                        format!("{v:?}"),
                        format!("{:?}", fs.meta(k).unwrap()),
                        "{k}"
                    );
                }
            }
            // The in-memory tables are the file's tensors.
            let tables = session_tables(&e, &key, "alice").unwrap();
            assert_eq!(tables.bytes(), table_bytes);
            for (n, d) in &tables.tensors {
                assert_eq!(d, &bytes_of(&mut fs, n));
            }
            assert_eq!(tables.tensors.len(), if untied { 2 } else { 1 });
        }
    }

    #[test]
    fn rekey_refuses_wrong_key_rekeyed_input_bad_labels_and_existing_output() {
        let key = SecretKey::from_bytes([4; 32]);
        let dir = tempfile::tempdir().unwrap();
        let (p, e, s) = (
            dir.path().join("p.gguf"),
            dir.path().join("e.gguf"),
            dir.path().join("s.gguf"),
        );
        model(GgmlDType::Q4_1, false).write(&p).unwrap();
        let err = rekey_gguf(&p, &key, "a", &s, false).unwrap_err();
        assert!(matches!(err, ModelError::NotEncrypted(_)), "{err}");
        encrypt_gguf(&key, &p, &e, &EncryptOptions::default()).unwrap();
        let other = SecretKey::from_bytes([5; 32]);
        let err = rekey_gguf(&e, &other, "a", &s, false).unwrap_err();
        assert!(matches!(err, ModelError::WrongKey { .. }), "{err}");
        let err = rekey_gguf(&e, &key, "two words", &s, false).unwrap_err();
        assert!(err.to_string().contains("invalid session label"), "{err}");
        assert!(!s.exists());
        rekey_gguf(&e, &key, "a", &s, false).unwrap();
        let err = rekey_gguf(&e, &key, "a", &s, false).unwrap_err();
        assert!(matches!(err, ModelError::OutputExists(_)), "{err}");
        let first = std::fs::read(&s).unwrap();
        rekey_gguf(&e, &key, "a", &s, true).unwrap();
        assert_eq!(first, std::fs::read(&s).unwrap(), "deterministic");
        let s2 = dir.path().join("s2.gguf");
        let err = rekey_gguf(&s, &key, "b", &s2, false).unwrap_err();
        assert!(matches!(err, ModelError::AlreadyRekeyed { .. }), "{err}");
        assert!(err.to_string().contains("re-key the base"), "{err}");
        assert!(!s2.exists());
        let leftovers = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .count();
        assert_eq!(leftovers, 0);
    }
}
