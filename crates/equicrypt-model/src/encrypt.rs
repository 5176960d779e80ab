//! The encrypt pipeline for decoder GGUF models (every [`KnownFamily`]: `llama`, `gemma3`), and
//! what an encrypted file declares about itself.
//!
//! The output is an ordinary GGUF that stock llama.cpp loads: the tokenizer is replaced by opaque
//! placeholders indexed by ciphertext id (`tokenizer.ggml.model = "llama"`, zero scores, all
//! tokens normal), and `bos_token_id` / `eos_token_id` hold *ciphertext* ids so the engine stops
//! at the real end of generation. Storing them tells the server which ciphertext ids are BOS and
//! EOS; nothing else about the vocabulary is stored (no token strings, merges or chat template).
//!
//! # Hidden special ids
//!
//! With [`EncryptOptions::hide_special_ids`] the file stores no `bos_token_id` / `eos_token_id`
//! and sets [`META_SPECIAL_IDS_HIDDEN`] (not secret). Our server then knows no EOS and stops only
//! at the request's `stop_ids`; the client can send none and stop itself (see
//! `equicrypt_client::remote::GenerateParams::hide_stop_ids`). Stock llama.cpp fills in its own
//! defaults for a `"llama"` (SentencePiece) tokenizer without those keys: BOS = id 1, EOS = id 2
//! (unknown = 0), and treats ciphertext id 2 as end of generation, although it is an ordinary
//! token. `ignore_eos: true` would make llama-server ban id 2 (a −∞ logit bias) and change the
//! answer, so the client does not send it to llama-server: it lets llama-server stop at id 2 and
//! continues from there (`equicrypt_client::remote::BlindChat::generate`; greedy answers are
//! identical, tested against a real llama-server).
//!
//! What this hides and what it does not: the file and the requests no longer name the EOS/BOS
//! ciphertext ids, but the server still sees every stream end right after the EOS id (the client
//! disconnects there), and chat-template tokens (`<|im_start|>`, `<|im_end|>`, role names) sit at
//! fixed positions of every prompt, so traffic alone may identify them; the attack lab measures
//! how well.

use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file::Value;
use equicrypt_core::{
    ArchFamily, CoreError, KeyFingerprint, KnownFamily, LlamaConfig, LlamaPlan, ModelConfig,
    PermMode, SecretKey, TensorTransform,
};

use crate::gguf::{GgufFile, GgufWriter};
use crate::quant::transform_tensor;
use crate::source::{GgufSink, GgufSource, TensorInfo, TensorSink, TensorSource};
use crate::ModelError;

/// Metadata key holding the format version of an encrypted model.
pub const META_VERSION: &str = "equicrypt.format_version";
/// Metadata key holding the key fingerprint.
pub const META_FINGERPRINT: &str = "equicrypt.key_fingerprint";
/// Metadata key holding the encryption mode.
pub const META_MODE: &str = "equicrypt.mode";
/// Metadata key set to `true` when the file stores no BOS/EOS ids ([`EncryptOptions::hide_special_ids`]).
pub const META_SPECIAL_IDS_HIDDEN: &str = "equicrypt.special_ids_hidden";
/// Current encrypted-model format version.
pub const FORMAT_VERSION: u32 = 1;

/// Placeholder text of ciphertext token `id` in an encrypted file.
pub fn placeholder_token(id: usize) -> String {
    format!("<ct{id}>")
}

/// Options of [`encrypt_gguf`].
#[derive(Clone, Debug, Default)]
pub struct EncryptOptions {
    /// Key space to draw from.
    pub mode: PermMode,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Replace an existing output file.
    pub overwrite: bool,
    /// Store no BOS/EOS ids (see the module docs for what stock llama.cpp then assumes).
    pub hide_special_ids: bool,
}

/// What [`encrypt_gguf`] did.
#[derive(Clone, Debug)]
pub struct EncryptReport {
    /// Number of tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Fingerprint of the key used.
    pub fingerprint: KeyFingerprint,
}

/// Reads the configuration of a GGUF file with its family's one config reader
/// ([`KnownFamily::read`] over [`crate::GgufMeta`]): errors name an unsupported architecture.
pub fn model_config(f: &GgufFile) -> Result<ModelConfig, ModelError> {
    Ok(KnownFamily::read(f)?.1)
}

/// The decoder shape the transform plan needs, for any supported family.
pub fn llama_shape(f: &GgufFile) -> Result<LlamaConfig, ModelError> {
    Ok(model_config(f)?.base().clone())
}

/// The finest quantization sub-block among the tensors of `src` (32 when none is finer), the
/// group an [`PermMode::Exact`] plan must stay inside.
pub fn finest_sub_block(src: &dyn TensorSource) -> Result<usize, ModelError> {
    let mut finest = equicrypt_core::QUANT_BLOCK;
    for t in src.tensor_infos() {
        let f = crate::quant::BlockFormat::of(t.dtype).map_err(|e| match e {
            ModelError::UnsupportedTensorType(ty) => {
                ModelError::UnsupportedTensorType(format!("{ty} (tensor '{}')", t.name))
            }
            other => other,
        })?;
        if f.block_elems() > 1 {
            finest = finest.min(f.sub_block());
        }
    }
    Ok(finest)
}

/// What an encrypted model file declares about itself.
#[derive(Clone, Debug)]
pub struct EncryptedModelInfo {
    /// Fingerprint of the key that encrypted it.
    pub fingerprint: KeyFingerprint,
    /// Encryption mode.
    pub mode: PermMode,
}

impl EncryptedModelInfo {
    /// Reads the equicrypt metadata; errors if the file is not an encrypted model.
    pub fn read(f: &GgufFile) -> Result<Self, ModelError> {
        let fp = match f.meta(META_FINGERPRINT) {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(ModelError::NotEncrypted(f.path().display().to_string())),
        };
        let mode = PermMode::parse(f.meta_str(META_MODE)?)?;
        Ok(Self {
            fingerprint: KeyFingerprint(fp),
            mode,
        })
    }

    /// Errors unless `key` is the key this model was encrypted with.
    pub fn check_key(&self, key: &SecretKey) -> Result<(), ModelError> {
        let have = key.fingerprint();
        if have == self.fingerprint {
            Ok(())
        } else {
            Err(ModelError::WrongKey {
                model: self.fingerprint.0.clone(),
                key: have.0,
            })
        }
    }
}

/// Whether a GGUF file carries equicrypt metadata.
pub fn is_encrypted(f: &GgufFile) -> bool {
    f.meta(META_FINGERPRINT).is_some()
}

/// Metadata keys copied unchanged from the plaintext model: the architecture's hyper-parameters
/// (`<arch>.*`) and format keys.
fn keep_key(k: &str, arch: &str) -> bool {
    k.strip_prefix(arch)
        .is_some_and(|rest| rest.starts_with('.'))
        || matches!(
            k,
            "general.architecture"
                | "general.alignment"
                | "general.quantization_version"
                | "general.file_type"
        )
}

/// Builds the metadata of the encrypted file.
fn encrypted_metadata(
    plain: &GgufFile,
    plan: &LlamaPlan,
    key: &SecretKey,
    hide_special_ids: bool,
    arch: &str,
) -> Result<Vec<(String, Value)>, ModelError> {
    let mut kept: Vec<(String, Value)> = plain
        .content
        .metadata
        .iter()
        .filter(|(k, _)| keep_key(k, arch))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta = vec![(
        "general.architecture".to_string(),
        Value::String(arch.into()),
    )];
    meta.extend(
        kept.into_iter()
            .filter(|(k, _)| k != "general.architecture"),
    );
    let n = plan.config.vocab_size;
    let special = |key_name: &str| -> Result<Option<u32>, ModelError> {
        match plain.meta(key_name) {
            None => Ok(None),
            Some(v) => {
                let id = v
                    .to_u32()
                    .map_err(|_| ModelError::Metadata(format!("'{key_name}' is not a u32")))?;
                Ok(Some(plan.vocab.encrypt_id(id)?))
            }
        }
    };
    let bos = special("tokenizer.ggml.bos_token_id")?;
    let eos = special("tokenizer.ggml.eos_token_id")?;
    meta.push((
        "general.name".into(),
        Value::String("equicrypt-encrypted".into()),
    ));
    meta.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
    meta.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(
            (0..n)
                .map(|i| Value::String(placeholder_token(i)))
                .collect(),
        ),
    ));
    meta.push((
        "tokenizer.ggml.scores".into(),
        Value::Array(vec![Value::F32(0.0); n]),
    ));
    meta.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(vec![Value::I32(1); n]),
    ));
    meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)));
    meta.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    if hide_special_ids {
        meta.push((META_SPECIAL_IDS_HIDDEN.into(), Value::Bool(true)));
    } else {
        if let Some(b) = bos {
            meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
        }
        if let Some(e) = eos {
            meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
        }
    }
    meta.push((META_VERSION.into(), Value::U32(FORMAT_VERSION)));
    meta.push((META_MODE.into(), Value::String(plan.mode.as_str().into())));
    meta.push((META_FINGERPRINT.into(), Value::String(key.fingerprint().0)));
    Ok(meta)
}

/// Encrypts the LLaMA-family GGUF at `input` into `output` with `key`.
///
/// Streams tensor by tensor (peak memory ≈ twice the largest tensor) and writes atomically: on
/// any error no output file is left behind.
pub fn encrypt_gguf(
    key: &SecretKey,
    input: &Path,
    output: &Path,
    opts: &EncryptOptions,
) -> Result<EncryptReport, ModelError> {
    let start = Instant::now();
    if output.exists() && !opts.overwrite {
        return Err(ModelError::OutputExists(output.display().to_string()));
    }
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize()) {
        if a == b {
            return Err(ModelError::OutputExists(output.display().to_string()));
        }
    }
    let mut plain: GgufSource = GgufFile::open(input)?;
    if is_encrypted(&plain) {
        return Err(ModelError::AlreadyEncrypted(input.display().to_string()));
    }
    let (family, config) = KnownFamily::read(plain.metadata())?;
    let sub_block = finest_sub_block(&plain)?;
    let plan = LlamaPlan::derive_for_sub_block(key, config.base().clone(), opts.mode, sub_block)?;
    let jobs = plan_jobs(&family, &plan, &plain)?;
    let headers = jobs.iter().map(|(t, _)| t.clone()).collect();
    let meta = encrypted_metadata(&plain, &plan, key, opts.hide_special_ids, family.arch())?;
    let writer: GgufSink = GgufWriter::create(output, &meta, headers)?;

    let total: u64 = jobs.iter().map(|(t, _)| t.size).sum();
    let bar = progress_bar(total, opts.progress);
    transform_into(&mut plain, writer, &jobs, &bar)?;
    bar.finish_and_clear();
    Ok(EncryptReport {
        tensors: jobs.len(),
        bytes: total,
        seconds: start.elapsed().as_secs_f64(),
        fingerprint: key.fingerprint(),
    })
}

/// The encrypt progress bar over `total` bytes on stderr, or a hidden one.
pub(crate) fn progress_bar(total: u64, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template("encrypting {bar:40} {bytes}/{total_bytes} {msg}")
            .expect("static template"),
    );
    b
}

/// Resolves every tensor's transform (by role, through the family) before anything is written:
/// unknown tensors and unsupported storage types are errors naming the tensor.
pub fn plan_jobs<F: ArchFamily>(
    family: &F,
    plan: &LlamaPlan,
    src: &dyn TensorSource,
) -> Result<Vec<(TensorInfo, TensorTransform)>, ModelError> {
    let infos = src.tensor_infos();
    let mut jobs = Vec::with_capacity(infos.len());
    for t in infos {
        let role = family
            .role_of(&t.name)
            .ok_or_else(|| CoreError::UnsupportedTensor(t.name.clone()))?;
        let tr = plan.transform_for_role(role)?;
        let cols = *t.dims.last().unwrap_or(&1);
        let rows = t.dims.iter().rev().skip(1).product::<usize>();
        crate::quant::check_transform(t.dtype, rows, cols, &tr).map_err(|e| match e {
            ModelError::UnsupportedTensorType(ty) => {
                ModelError::UnsupportedTensorType(format!("{ty} (tensor '{}')", t.name))
            }
            other => other.in_tensor(&t.name),
        })?;
        jobs.push((t, tr));
    }
    Ok(jobs)
}

/// Streams every job's tensor from `src` through its transform into `sink` (in job order) and
/// finishes the sink; on error the sink is dropped and leaves no file.
pub fn transform_into<S: TensorSource + ?Sized, K: TensorSink>(
    src: &mut S,
    mut sink: K,
    jobs: &[(TensorInfo, TensorTransform)],
    bar: &indicatif::ProgressBar,
) -> Result<(), ModelError> {
    for (t, tr) in jobs {
        bar.set_message(t.name.clone());
        let data = src.read_tensor_bytes(&t.name)?;
        let cols = *t.dims.last().unwrap_or(&1);
        let rows = t.dims.iter().rev().skip(1).product::<usize>();
        let out = if tr.is_identity() {
            data
        } else {
            transform_tensor(&data, t.dtype, rows, cols, tr).map_err(|e| e.in_tensor(&t.name))?
        };
        sink.write_tensor(&t.name, &out)?;
        bar.inc(t.size);
    }
    sink.finish()
}
