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
use crate::quant::{check_transform, transform_row, BlockFormat};
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
    /// The mode recorded in the output (encoders always use [`PermMode::Full`]).
    pub mode: PermMode,
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
/// Streams every tensor through a bounded buffer ([`transform_into`]: peak memory ≈ one
/// [`STREAM_CHUNK_BYTES`] chunk plus one row, independent of tensor size) and writes atomically:
/// on any error no output file is left behind.
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
        mode: plan.mode,
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
    plan_jobs_by(src, |name| {
        let role = family
            .role_of(name)
            .ok_or_else(|| CoreError::UnsupportedTensor(name.to_string()))?;
        plan.transform_for_role(role)
    })
}

/// [`plan_jobs`] with the transform of each tensor name given by `transform_for` (a plan that
/// knows tensors by name, such as an encoder's).
pub fn plan_jobs_by(
    src: &dyn TensorSource,
    transform_for: impl Fn(&str) -> Result<TensorTransform, CoreError>,
) -> Result<Vec<(TensorInfo, TensorTransform)>, ModelError> {
    let infos = src.tensor_infos();
    let mut jobs = Vec::with_capacity(infos.len());
    for t in infos {
        let tr = transform_for(&t.name)?;
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

/// Output bytes [`transform_into`] produces per step (8 MiB): the bound of its buffer.
pub const STREAM_CHUNK_BYTES: usize = 8 << 20;

/// Streams every job's tensor from `src` through its transform into `sink` (in job order) and
/// finishes the sink; on error the sink is dropped and leaves no file.
///
/// Memory invariant: no tensor is ever held whole. Each tensor goes through one reused buffer in
/// chunks of at most [`STREAM_CHUNK_BYTES`] of output, read with
/// [`TensorSource::read_tensor_range`] and written with [`TensorSink::write_part`]:
/// identity tensors are copied chunk by chunk; a transformed tensor is produced whole output rows
/// at a time, output row `d` read from input row `r = rows⁻¹(d)` (one read per run of
/// consecutive input rows, so a tensor whose rows do not move is read in whole chunks) and
/// transformed in place through a one-row scratch (`quant::transform_row`, the step
/// [`crate::quant::transform_tensor`] uses). Peak memory is therefore about one chunk plus one
/// row (a chunk holds at least one row), independent of the tensor's size. The bytes written are
/// exactly those of [`crate::quant::transform_tensor`].
pub fn transform_into<S: TensorSource + ?Sized, K: TensorSink>(
    src: &mut S,
    sink: K,
    jobs: &[(TensorInfo, TensorTransform)],
    bar: &indicatif::ProgressBar,
) -> Result<(), ModelError> {
    transform_into_chunked(src, sink, jobs, bar, STREAM_CHUNK_BYTES)
}

/// [`transform_into`] with chunks of at most `chunk_bytes` of output (at least one byte for an
/// identity tensor, at least one row for a transformed one).
pub(crate) fn transform_into_chunked<S: TensorSource + ?Sized, K: TensorSink>(
    src: &mut S,
    mut sink: K,
    jobs: &[(TensorInfo, TensorTransform)],
    bar: &indicatif::ProgressBar,
    chunk_bytes: usize,
) -> Result<(), ModelError> {
    let mut buf = Vec::new();
    let mut scratch = Vec::new();
    for (t, tr) in jobs {
        bar.set_message(t.name.clone());
        sink.begin_tensor(&t.name)?;
        if tr.is_identity() {
            copy_tensor(src, &mut sink, t, chunk_bytes, &mut buf, bar)?;
        } else {
            stream_rows(
                src,
                &mut sink,
                t,
                tr,
                chunk_bytes,
                &mut buf,
                &mut scratch,
                bar,
            )?;
        }
        sink.end_tensor()?;
    }
    sink.finish()
}

/// Grows `buf` to at least `len` bytes (never shrinks, never clears) and returns its first `len`.
fn buffer(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// Copies the bytes of `t` from `src` to the open tensor of `sink`, `chunk_bytes` at a time.
fn copy_tensor<S: TensorSource + ?Sized, K: TensorSink>(
    src: &mut S,
    sink: &mut K,
    t: &TensorInfo,
    chunk_bytes: usize,
    buf: &mut Vec<u8>,
    bar: &indicatif::ProgressBar,
) -> Result<(), ModelError> {
    let step = chunk_bytes.max(1) as u64;
    let mut at = 0u64;
    while at < t.size {
        let n = step.min(t.size - at);
        let chunk = buffer(buf, n as usize);
        src.read_tensor_range(&t.name, at, chunk)?;
        sink.write_part(chunk)?;
        bar.inc(n);
        at += n;
    }
    Ok(())
}

/// Writes `t` transformed by `tr` to the open tensor of `sink`, whole output rows at a time
/// (as many as fit in `chunk_bytes`, at least one), each read from its input row and transformed
/// in place through the one-row `scratch`.
#[allow(clippy::too_many_arguments)]
fn stream_rows<S: TensorSource + ?Sized, K: TensorSink>(
    src: &mut S,
    sink: &mut K,
    t: &TensorInfo,
    tr: &TensorTransform,
    chunk_bytes: usize,
    buf: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    bar: &indicatif::ProgressBar,
) -> Result<(), ModelError> {
    let cols = *t.dims.last().unwrap_or(&1);
    let rows = t.dims.iter().rev().skip(1).product::<usize>();
    check_transform(t.dtype, rows, cols, tr).map_err(|e| e.in_tensor(&t.name))?;
    let fmt = BlockFormat::of(t.dtype)?;
    let row_bytes = fmt.row_bytes(cols);
    if (rows * row_bytes) as u64 != t.size {
        return Err(ModelError::Corrupt(format!(
            "tensor has {} bytes, expected {} for {rows}×{cols} {:?}",
            t.size,
            rows * row_bytes,
            t.dtype
        ))
        .in_tensor(&t.name));
    }
    if row_bytes == 0 {
        return Ok(());
    }
    // The input row that lands at output row `d`.
    let source_row = |d: usize| tr.rows.as_ref().map_or(d, |p| p.invert(d as u32) as usize);
    let per_chunk = (chunk_bytes / row_bytes).clamp(1, rows.max(1));
    let scratch = buffer(scratch, row_bytes);
    let mut first = 0;
    while first < rows {
        let n = per_chunk.min(rows - first);
        let chunk = buffer(buf, n * row_bytes);
        // Fill output rows `first .. first + n` with their input rows, one read per run of
        // consecutive input rows.
        let mut i = 0;
        while i < n {
            let r = source_row(first + i);
            let mut run = 1;
            while i + run < n && source_row(first + i + run) == r + run {
                run += 1;
            }
            let into = &mut chunk[i * row_bytes..(i + run) * row_bytes];
            src.read_tensor_range(&t.name, (r * row_bytes) as u64, into)?;
            i += run;
        }
        for (i, row) in chunk.chunks_exact_mut(row_bytes).enumerate() {
            scratch.copy_from_slice(row);
            transform_row(scratch, source_row(first + i), row, fmt, tr);
        }
        sink.write_part(chunk)?;
        bar.inc(chunk.len() as u64);
        first += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::transform_tensor;
    use crate::{SafetensorsSink, SafetensorsSource};
    use candle_core::quantized::GgmlDType;
    use equicrypt_core::Permutation;

    /// A column permutation as lossless as `dtype` allows: any for floats; for block types, blocks
    /// move, sub-blocks move inside their block and values inside their sub-block.
    fn lossless_cols(dtype: GgmlDType, cols: usize, key: &SecretKey, label: &str) -> Permutation {
        let rng = &mut key.stream(label);
        let f = BlockFormat::of(dtype).unwrap();
        let (be, sb) = (f.block_elems(), f.sub_block());
        if be == 1 {
            return Permutation::random(cols, rng);
        }
        let inner: Vec<_> = (0..cols / be)
            .map(|_| {
                let subs: Vec<_> = (0..be / sb).map(|_| Permutation::random(sb, rng)).collect();
                Permutation::blocked(&Permutation::random(be / sb, rng), &subs)
            })
            .collect();
        Permutation::blocked(&Permutation::random(cols / be, rng), &inner)
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    /// Tensors of every kind of job: each dtype with an identity transform; rows and columns
    /// moved with negated rows (and columns, floats); rows negated where they stand (reads
    /// coalesce into whole chunks); rows rotated (runs of consecutive input rows broken once);
    /// columns only. Returns the jobs and each tensor's plain bytes.
    fn cases(float_only: bool) -> (Vec<(TensorInfo, TensorTransform)>, Vec<Vec<u8>>) {
        let shapes: [(GgmlDType, Vec<usize>); 6] = [
            (GgmlDType::F32, vec![5, 48]),
            (GgmlDType::BF16, vec![9, 40]),
            (GgmlDType::F16, vec![64]),
            (GgmlDType::F16, vec![2, 3, 16]),
            (GgmlDType::Q8_0, vec![6, 96]),
            (GgmlDType::Q4K, vec![4, 512]),
        ];
        let key = SecretKey::from_bytes([42; 32]);
        let rng = &mut key.stream("streaming-test");
        let (mut jobs, mut data) = (Vec::new(), Vec::new());
        for (k, (dtype, dims)) in shapes.into_iter().enumerate() {
            let f = BlockFormat::of(dtype).unwrap();
            if float_only && f.block_elems() > 1 {
                continue;
            }
            let cols = *dims.last().unwrap();
            let rows: usize = dims.iter().rev().skip(1).product();
            let size = rows * f.row_bytes(cols);
            let negate: Vec<bool> = noise(rows, k as u64).iter().map(|b| b & 1 == 1).collect();
            let float = f.block_elems() == 1;
            let transforms = [
                TensorTransform::default(),
                TensorTransform {
                    rows: Some(Permutation::random(rows, rng)),
                    cols: Some(lossless_cols(dtype, cols, &key, &format!("a{k}"))),
                    negate_rows: Some(negate.clone()),
                    negate_cols: float.then(|| {
                        noise(cols, 7 + k as u64)
                            .iter()
                            .map(|b| b & 1 == 0)
                            .collect()
                    }),
                },
                TensorTransform {
                    negate_rows: Some(negate),
                    ..Default::default()
                },
                TensorTransform {
                    rows: Some(
                        Permutation::from_forward(
                            (0..rows as u32).map(|r| (r + 2) % rows as u32).collect(),
                        )
                        .unwrap(),
                    ),
                    ..Default::default()
                },
                TensorTransform {
                    cols: Some(lossless_cols(dtype, cols, &key, &format!("b{k}"))),
                    ..Default::default()
                },
            ];
            for (j, tr) in transforms.into_iter().enumerate() {
                let info = TensorInfo {
                    name: format!("t{k}.{j}"),
                    dtype,
                    dims: dims.clone(),
                    size: size as u64,
                };
                data.push(noise(size, 100 * k as u64 + j as u64));
                jobs.push((info, tr));
            }
        }
        (jobs, data)
    }

    fn expected(jobs: &[(TensorInfo, TensorTransform)], data: &[Vec<u8>]) -> Vec<Vec<u8>> {
        jobs.iter()
            .zip(data)
            .map(|((t, tr), d)| {
                let cols = *t.dims.last().unwrap();
                let rows = t.dims.iter().rev().skip(1).product();
                transform_tensor(d, t.dtype, rows, cols, tr).unwrap()
            })
            .collect()
    }

    fn write_gguf(path: &Path, jobs: &[(TensorInfo, TensorTransform)], data: &[Vec<u8>]) {
        let headers = jobs.iter().map(|(t, _)| t.clone()).collect();
        let meta = [("general.alignment".to_string(), Value::U32(32))];
        let mut w = GgufWriter::create(path, &meta, headers).unwrap();
        for ((t, _), d) in jobs.iter().zip(data) {
            w.write_tensor(&t.name, d).unwrap();
        }
        w.finish().unwrap();
    }

    /// An in-memory sink that records every part it is given.
    struct Recorder {
        headers: Vec<TensorInfo>,
        tensors: Vec<Vec<u8>>,
        largest_part: Vec<usize>,
    }

    impl TensorSink for Recorder {
        fn begin_tensor(&mut self, name: &str) -> Result<(), ModelError> {
            assert_eq!(self.headers[self.tensors.len()].name, name);
            self.tensors.push(Vec::new());
            self.largest_part.push(0);
            Ok(())
        }
        fn write_part(&mut self, data: &[u8]) -> Result<(), ModelError> {
            self.tensors.last_mut().unwrap().extend_from_slice(data);
            let l = self.largest_part.last_mut().unwrap();
            *l = (*l).max(data.len());
            Ok(())
        }
        fn end_tensor(&mut self) -> Result<(), ModelError> {
            let i = self.tensors.len() - 1;
            assert_eq!(self.tensors[i].len() as u64, self.headers[i].size);
            Ok(())
        }
        fn finish(self) -> Result<(), ModelError> {
            unreachable!("read through transform_into_recorded")
        }
    }

    /// Streaming writes exactly `transform_tensor`'s bytes for every dtype and kind of transform,
    /// at chunk sizes that split rows, hold one row, several rows with a remainder, or the whole
    /// tensor; and no part is larger than the chunk (a whole row for a transformed tensor).
    #[test]
    fn streaming_matches_transform_tensor_at_every_chunk_size() {
        let dir = tempfile::tempdir().unwrap();
        let (jobs, data) = cases(false);
        let want = expected(&jobs, &data);
        let path = dir.path().join("plain.gguf");
        write_gguf(&path, &jobs, &data);
        let mut src = GgufFile::open(&path).unwrap();
        let bar = indicatif::ProgressBar::hidden();
        for chunk in [
            1,
            7,
            79,
            80,
            81,
            101,
            103,
            191,
            250,
            289,
            577,
            1000,
            1 << 20,
        ] {
            // The recorder is inspected after streaming, so drive the loop without `finish`.
            let mut rec = Recorder {
                headers: jobs.iter().map(|(t, _)| t.clone()).collect(),
                tensors: Vec::new(),
                largest_part: Vec::new(),
            };
            let (mut buf, mut scratch) = (Vec::new(), Vec::new());
            for (t, tr) in &jobs {
                rec.begin_tensor(&t.name).unwrap();
                if tr.is_identity() {
                    copy_tensor(&mut src, &mut rec, t, chunk, &mut buf, &bar).unwrap();
                } else {
                    stream_rows(
                        &mut src,
                        &mut rec,
                        t,
                        tr,
                        chunk,
                        &mut buf,
                        &mut scratch,
                        &bar,
                    )
                    .unwrap();
                }
                rec.end_tensor().unwrap();
            }
            for (((t, tr), got), (want, largest)) in jobs
                .iter()
                .zip(&rec.tensors)
                .zip(want.iter().zip(&rec.largest_part))
            {
                assert_eq!(got, want, "{} at chunk {chunk}", t.name);
                let cols = *t.dims.last().unwrap();
                let row = BlockFormat::of(t.dtype).unwrap().row_bytes(cols);
                let bound = if tr.is_identity() {
                    chunk
                } else {
                    chunk.max(row)
                };
                assert!(*largest <= bound, "{}: part of {largest} > {bound}", t.name);
            }
            // The same through the real GGUF sink, read back.
            let out = dir.path().join(format!("enc-{chunk}.gguf"));
            let headers = jobs.iter().map(|(t, _)| t.clone()).collect();
            let sink = GgufWriter::create(&out, &[], headers).unwrap();
            transform_into_chunked(&mut src, sink, &jobs, &bar, chunk).unwrap();
            let mut back = GgufFile::open(&out).unwrap();
            for ((t, _), want) in jobs.iter().zip(&want) {
                assert_eq!(
                    &back.read_tensor_bytes(&t.name).unwrap(),
                    want,
                    "{}",
                    t.name
                );
            }
        }
    }

    /// The same from a safetensors source into a safetensors sink (float tensors only).
    #[test]
    fn streaming_through_safetensors_matches_transform_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let (jobs, data) = cases(true);
        let want = expected(&jobs, &data);
        let headers: Vec<TensorInfo> = jobs.iter().map(|(t, _)| t.clone()).collect();
        let plain = dir.path().join("plain.safetensors");
        let mut sink =
            SafetensorsSink::create(&plain, &Default::default(), headers.clone()).unwrap();
        for ((t, _), d) in jobs.iter().zip(&data) {
            sink.write_tensor(&t.name, d).unwrap();
        }
        sink.finish().unwrap();
        let mut src = SafetensorsSource::open(&plain).unwrap();
        let bar = indicatif::ProgressBar::hidden();
        for chunk in [3, 100, STREAM_CHUNK_BYTES] {
            let out = dir.path().join(format!("enc-{chunk}.safetensors"));
            let sink = SafetensorsSink::create(&out, &Default::default(), headers.clone()).unwrap();
            transform_into_chunked(&mut src, sink, &jobs, &bar, chunk).unwrap();
            let mut back = SafetensorsSource::open(&out).unwrap();
            for ((t, _), want) in jobs.iter().zip(&want) {
                assert_eq!(
                    &back.read_tensor_bytes(&t.name).unwrap(),
                    want,
                    "{}",
                    t.name
                );
            }
        }
    }

    /// A failure mid-tensor (here: the source refuses a read) leaves no output file.
    #[test]
    fn a_failed_stream_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut jobs, data) = cases(false);
        let path = dir.path().join("plain.gguf");
        write_gguf(&path, &jobs, &data);
        let mut src = GgufFile::open(&path).unwrap();
        // The last tensor claims one more row than the file holds.
        let (last, tr) = jobs.last_mut().unwrap();
        last.size += last.size / last.dims[0] as u64;
        last.dims[0] += 1;
        *tr = TensorTransform::default();
        let name = last.name.clone();
        let headers = jobs.iter().map(|(t, _)| t.clone()).collect();
        let out = dir.path().join("enc.gguf");
        let sink = GgufWriter::create(&out, &[], headers).unwrap();
        let bar = indicatif::ProgressBar::hidden();
        let e = transform_into_chunked(&mut src, sink, &jobs, &bar, 64).unwrap_err();
        assert!(e.to_string().contains(&name), "{e}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["plain.gguf"]);
    }
}
