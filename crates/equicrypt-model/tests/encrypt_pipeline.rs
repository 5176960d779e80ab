//! The encrypt pipeline on synthetic GGUF models: metadata, leak check, atomicity, bad input.

use std::path::Path;

use candle_core::quantized::GgmlDType;
use equicrypt_core::{LlamaPlan, PermMode, SecretKey};
use equicrypt_model::quant::transform_tensor;
use equicrypt_model::{
    encrypt_gguf, inspect::leak_check, llama_shape, synthetic::SyntheticLlama, EncryptOptions,
    EncryptedModelInfo, GgufFile, ModelError,
};

fn q41_model(seed: u64) -> SyntheticLlama {
    let mut m = SyntheticLlama::tiny_f32(seed);
    m.matrix_dtype = GgmlDType::Q4_1;
    m.embed_dtype = GgmlDType::Q8_0;
    m
}

fn only_file_is(dir: &Path, names: &[&str]) {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(found, want, "unexpected files left in {}", dir.display());
}

#[test]
fn encrypted_file_matches_plan_and_hides_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let (plain_p, enc_p) = (dir.path().join("plain.gguf"), dir.path().join("enc.gguf"));
    q41_model(1).write(&plain_p).unwrap();
    let key = SecretKey::from_bytes([9; 32]);
    let report = encrypt_gguf(&key, &plain_p, &enc_p, &EncryptOptions::default()).unwrap();
    assert_eq!(report.fingerprint, key.fingerprint());

    let mut plain = GgufFile::open(&plain_p).unwrap();
    let mut enc = GgufFile::open(&enc_p).unwrap();
    let info = EncryptedModelInfo::read(&enc).unwrap();
    info.check_key(&key).unwrap();
    assert_eq!(info.mode, PermMode::Stock, "stock is the default mode");
    assert!(leak_check(&enc).is_empty(), "{:?}", leak_check(&enc));

    let plan = LlamaPlan::derive(&key, llama_shape(&plain).unwrap(), PermMode::Stock).unwrap();
    let eos = enc
        .meta("tokenizer.ggml.eos_token_id")
        .unwrap()
        .to_u32()
        .unwrap();
    assert_eq!(eos, plan.vocab.encrypt_id(2).unwrap());
    assert_eq!(plain.tensors.len(), enc.tensors.len());
    for t in plain.tensors.clone() {
        let e = enc.tensor(&t.name).unwrap().clone();
        assert_eq!((e.dtype, &e.dims), (t.dtype, &t.dims));
        let (rows, cols) = t.rows_cols();
        let want = transform_tensor(
            &plain.read_tensor(&t).unwrap(),
            t.dtype,
            rows,
            cols,
            &plan.transform_for(&t.name).unwrap(),
        )
        .unwrap();
        assert_eq!(enc.read_tensor(&e).unwrap(), want, "{}", t.name);
    }
}

#[test]
fn wrong_key_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (plain_p, enc_p) = (dir.path().join("p.gguf"), dir.path().join("e.gguf"));
    q41_model(2).write(&plain_p).unwrap();
    encrypt_gguf(
        &SecretKey::from_bytes([1; 32]),
        &plain_p,
        &enc_p,
        &Default::default(),
    )
    .unwrap();
    let enc = GgufFile::open(&enc_p).unwrap();
    let err = EncryptedModelInfo::read(&enc)
        .unwrap()
        .check_key(&SecretKey::from_bytes([2; 32]))
        .unwrap_err();
    assert!(matches!(err, ModelError::WrongKey { .. }), "{err}");
    // A plaintext model is not an encrypted one.
    let plain = GgufFile::open(&plain_p).unwrap();
    assert!(matches!(
        EncryptedModelInfo::read(&plain),
        Err(ModelError::NotEncrypted(_))
    ));
}

#[test]
fn bad_inputs_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::from_bytes([3; 32]);
    let plain_p = dir.path().join("p.gguf");
    q41_model(3).write(&plain_p).unwrap();
    let bytes = std::fs::read(&plain_p).unwrap();

    // Truncated file.
    let trunc = dir.path().join("trunc.gguf");
    std::fs::write(&trunc, &bytes[..bytes.len() - 100]).unwrap();
    let out = dir.path().join("out.gguf");
    let e = encrypt_gguf(&key, &trunc, &out, &Default::default()).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");

    // Garbage.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let e = encrypt_gguf(&key, &junk, &out, &Default::default()).unwrap_err();
    assert!(e.to_string().contains("not a valid GGUF"), "{e}");

    // Missing input.
    let e = encrypt_gguf(
        &key,
        &dir.path().join("nope.gguf"),
        &out,
        &Default::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("nope.gguf"), "{e}");

    // Unwritable output directory.
    let e = encrypt_gguf(
        &key,
        &plain_p,
        &dir.path().join("no/such/dir/o.gguf"),
        &Default::default(),
    )
    .unwrap_err();
    assert!(matches!(e, ModelError::Io { .. }), "{e}");

    // Full mode on K-quants would be lossy: refused, naming the tensor.
    let mut k = q41_model(4);
    // Two super-blocks per row: full mode's 32-block moves cross them.
    k.shape.d_model = 512;
    k.shape.d_ff = 512;
    k.matrix_dtype = GgmlDType::Q4K;
    let kq = dir.path().join("kq.gguf");
    k.write(&kq).unwrap();
    let full = EncryptOptions {
        mode: PermMode::Full,
        ..Default::default()
    };
    let e = encrypt_gguf(&key, &kq, &out, &full).unwrap_err();
    assert!(
        e.to_string().contains("Q4K") && e.to_string().contains("tensor '"),
        "{e}"
    );

    only_file_is(
        dir.path(),
        &["p.gguf", "trunc.gguf", "junk.gguf", "kq.gguf"],
    );

    // Existing output is not overwritten; encrypting twice is refused.
    encrypt_gguf(&key, &plain_p, &out, &Default::default()).unwrap();
    let e = encrypt_gguf(&key, &plain_p, &out, &Default::default()).unwrap_err();
    assert!(matches!(e, ModelError::OutputExists(_)), "{e}");
    let e = encrypt_gguf(
        &key,
        &out,
        &dir.path().join("twice.gguf"),
        &Default::default(),
    )
    .unwrap_err();
    assert!(matches!(e, ModelError::AlreadyEncrypted(_)), "{e}");
}

#[test]
fn encryption_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.gguf");
    q41_model(5).write(&p).unwrap();
    let key = SecretKey::from_bytes([5; 32]);
    for mode in [PermMode::Stock, PermMode::Exact, PermMode::Full] {
        let opts = EncryptOptions {
            mode,
            ..Default::default()
        };
        let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
        encrypt_gguf(&key, &p, &a, &opts).unwrap();
        encrypt_gguf(&key, &p, &b, &opts).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        std::fs::remove_file(a).unwrap();
        std::fs::remove_file(b).unwrap();
    }
}

/// Golden vector: a fixed key and a fixed synthetic model give this exact encrypted file in every
/// future version (plan derivation, tensor transforms and the file layout are all pinned).
#[test]
fn golden_encrypted_file_digest() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.gguf");
    q41_model(42).write(&p).unwrap();
    let key = SecretKey::from_bytes(*b"equicrypt golden key 0123456789!");
    let plain_digest = blake3::hash(&std::fs::read(&p).unwrap())
        .to_hex()
        .to_string();
    // The plaintext digest pins the synthetic model itself (so a failure below is ours).
    assert_eq!(
        plain_digest,
        "590ccbc3ea9a87c10e46e27eaf288122dd94548d0dc6d84f63de08a49d3f92c2"
    );
    // `exact` is the digest pinned before the stock mode existed (the refactor guard);
    // `stock` pins the default mode.
    for (mode, want) in [
        (
            PermMode::Exact,
            "2c796b9312a720b007ad3ce255e452b8655d07330963f635809cf6753d422223",
        ),
        (
            PermMode::Stock,
            "89e2f5a5327ece744a43cd6bf684d9ae90bee164b0c7a5bebb2114b76b6c8a14",
        ),
    ] {
        let e = dir.path().join(format!("{}.gguf", mode.as_str()));
        let opts = EncryptOptions {
            mode,
            ..Default::default()
        };
        encrypt_gguf(&key, &p, &e, &opts).unwrap();
        let enc_digest = blake3::hash(&std::fs::read(&e).unwrap())
            .to_hex()
            .to_string();
        assert_eq!(enc_digest, want, "{mode:?}");
    }
}

/// A GGUF of another architecture is refused with its name, before anything is written.
#[test]
fn unsupported_architecture_is_named() {
    use candle_core::quantized::gguf_file::Value;
    use equicrypt_model::{GgufWriter, TensorHeader};
    let dir = tempfile::tempdir().unwrap();
    let (p, q) = (dir.path().join("p.gguf"), dir.path().join("qwen.gguf"));
    q41_model(6).write(&p).unwrap();
    let mut src = GgufFile::open(&p).unwrap();
    let mut meta: Vec<(String, Value)> = src
        .content
        .metadata
        .iter()
        .map(|(k, v)| (k.replace("llama.", "qwen2."), v.clone()))
        .collect();
    for (k, v) in &mut meta {
        if k == "general.architecture" {
            *v = Value::String("mamba".into());
        }
    }
    let tensors = src.tensors.clone();
    let headers = tensors
        .iter()
        .map(|t| TensorHeader {
            name: t.name.clone(),
            dtype: t.dtype,
            dims: t.dims.clone(),
            size: t.size,
        })
        .collect();
    let mut w = GgufWriter::create(&q, &meta, headers).unwrap();
    for t in &tensors {
        w.write_tensor(&t.name, &src.read_tensor(t).unwrap())
            .unwrap();
    }
    w.finish().unwrap();
    let out = dir.path().join("out.gguf");
    let e = encrypt_gguf(
        &SecretKey::from_bytes([1; 32]),
        &q,
        &out,
        &Default::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e, ModelError::UnsupportedArchitecture(ref a) if a == "mamba"),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn hidden_special_ids_are_not_stored_and_inspect_says_so() {
    use equicrypt_model::encrypt::META_SPECIAL_IDS_HIDDEN;
    use equicrypt_model::inspect::{inspect, revealed_special_ids};
    let dir = tempfile::tempdir().unwrap();
    let (p, a, b) = (
        dir.path().join("p.gguf"),
        dir.path().join("a.gguf"),
        dir.path().join("b.gguf"),
    );
    q41_model(9).write(&p).unwrap();
    let key = SecretKey::from_bytes([9; 32]);
    encrypt_gguf(&key, &p, &a, &EncryptOptions::default()).unwrap();
    let hidden = EncryptOptions {
        hide_special_ids: true,
        ..Default::default()
    };
    encrypt_gguf(&key, &p, &b, &hidden).unwrap();
    let (fa, fb) = (GgufFile::open(&a).unwrap(), GgufFile::open(&b).unwrap());
    assert_eq!(revealed_special_ids(&fa).len(), 2);
    assert!(revealed_special_ids(&fb).is_empty());
    assert!(fb.meta("tokenizer.ggml.eos_token_id").is_none());
    assert!(fb.meta("tokenizer.ggml.bos_token_id").is_none());
    assert!(matches!(
        fb.meta(META_SPECIAL_IDS_HIDDEN),
        Some(candle_core::quantized::gguf_file::Value::Bool(true))
    ));
    assert!(leak_check(&fb).is_empty());
    assert!(inspect(&fb).special_ids.is_empty());
    assert_eq!(inspect(&fa).special_ids.len(), 2);
    // Same tensors either way.
    let (mut fa, mut fb) = (fa, fb);
    for t in fa.tensors.clone() {
        let tb = fb.tensor(&t.name).unwrap().clone();
        assert_eq!(fa.read_tensor(&t).unwrap(), fb.read_tensor(&tb).unwrap());
    }
}

/// Tensor types that cannot be repacked (IQ, ternary) are refused with their ggml name, before
/// anything is written.
#[test]
fn iq_tensor_types_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (plain_p, enc_p) = (dir.path().join("plain.gguf"), dir.path().join("enc.gguf"));
    SyntheticLlama::tiny_f32(3).write(&plain_p).unwrap();
    let mut bytes = std::fs::read(&plain_p).unwrap();
    // Tensor info: u64 name length, name, u32 n_dims, n_dims × u64, u32 type.
    let name = b"blk.0.attn_q.weight";
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name);
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
        + needle.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty = at + 4 + 8 * n_dims;
    for (id, label) in [(16u32, "IQ2_XXS"), (23, "IQ4_XS"), (35, "TQ2_0")] {
        bytes[ty..ty + 4].copy_from_slice(&id.to_le_bytes());
        std::fs::write(&plain_p, &bytes).unwrap();
        let key = SecretKey::from_bytes([1; 32]);
        let e = encrypt_gguf(&key, &plain_p, &enc_p, &EncryptOptions::default()).unwrap_err();
        assert!(
            matches!(e, ModelError::UnsupportedTensorType(_)) && e.to_string().contains(label),
            "{e}"
        );
        only_file_is(dir.path(), &["plain.gguf"]);
    }
}
