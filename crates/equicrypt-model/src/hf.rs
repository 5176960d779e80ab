//! Hugging Face transformers checkpoints in and out: a directory with `config.json`, one
//! `model.safetensors` or shards listed by `model.safetensors.index.json`, tokenizer files and
//! `generation_config.json`.
//!
//! [`encrypt_hf`] writes an encrypted checkpoint that transformers (and vLLM) load unchanged:
//! the same tensor names, dtypes, shapes and shard layout (each shard streamed through the
//! family's plan, [`crate::encrypt::transform_into`]); `config.json` and `generation_config.json`
//! with *ciphertext* special ids and no `_name_or_path`; a placeholder tokenizer (`<ctN>` for
//! ciphertext id `N`, no merges, no chat template) so engines that insist on a tokenizer start;
//! no plaintext vocabulary, merges, chat template or model name. The whole directory is built in a
//! temporary directory next to the destination and renamed into place: on any error nothing is
//! left. RoPE pairing is transformers' NeoX `(i, i + d/2)` ([`HfLlamaFamily`]); tied embeddings
//! stay tied (a checkpoint without `lm_head.weight` gets none).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use equicrypt_core::{
    ArchFamily, BertConfig, BertPlan, ConfigError, CoreError, HfLlamaFamily, KeyFingerprint,
    LlamaPlan, MetaValue, MetadataSource, PermMode, SecretKey, TensorTransform, VocabPermutation,
    BERT_MODEL_TYPES,
};
use serde_json::{json, Map, Value};

use crate::encrypt::{
    plan_jobs_by, transform_into, EncryptOptions, EncryptReport, EncryptedModelInfo, FORMAT_VERSION,
};
use crate::safetensors::{SafetensorsSink, SafetensorsSource};
use crate::source::{TensorInfo, TensorSource};
use crate::{placeholder_token, ModelError};

/// Key of the equicrypt record in an encrypted checkpoint's `config.json`.
pub const CONFIG_KEY: &str = "equicrypt";
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

/// Special-token keys of `config.json` / `generation_config.json` (a number or a list of numbers).
const SPECIAL_ID_KEYS: [&str; 4] = [
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
];

/// An opened transformers checkpoint directory: its config and its safetensors shards.
#[derive(Debug)]
pub struct HfCheckpoint {
    dir: PathBuf,
    config: Map<String, Value>,
    /// `config.json` flattened one level (`rope_scaling.factor`), for the config reader.
    flat: HashMap<String, Value>,
    /// Shard file names with their opened, validated sources, in order.
    shards: Vec<(String, SafetensorsSource)>,
    /// The shard index, when the checkpoint is sharded.
    index: Option<Value>,
    dims: HashMap<String, Vec<usize>>,
}

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::Metadata(format!("{}: not valid JSON ({e})", path.display())))
}

impl HfCheckpoint {
    /// Opens `dir`: parses `config.json`, finds the shards (the index's, or `model.safetensors`),
    /// opens and validates every shard, and checks that the index and the shards agree.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::Metadata(format!(
                "{} is not a checkpoint directory",
                dir.display()
            )));
        }
        let config = match read_json(&dir.join("config.json"))? {
            Value::Object(m) => m,
            _ => {
                return Err(ModelError::Metadata(format!(
                    "{}: config.json is not a JSON object",
                    dir.display()
                )))
            }
        };
        let mut flat = HashMap::new();
        for (k, v) in &config {
            if let Value::Object(inner) = v {
                for (k2, v2) in inner {
                    flat.insert(format!("{k}.{k2}"), v2.clone());
                }
            }
            flat.insert(k.clone(), v.clone());
        }
        let index_path = dir.join(INDEX);
        let (shards, index, claimed) = if index_path.exists() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| ModelError::Metadata(format!("{INDEX}: no weight_map object")))?;
            let mut claimed: HashMap<String, String> = HashMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    ModelError::Metadata(format!("{INDEX}: shard of '{name}' is not a string"))
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(ModelError::Metadata(format!(
                        "{INDEX}: shard name '{file}' is not a plain file name"
                    )));
                }
                claimed.insert(name.clone(), file.to_string());
            }
            let shards: BTreeSet<String> = claimed.values().cloned().collect();
            for s in &shards {
                if !dir.join(s).is_file() {
                    return Err(ModelError::Metadata(format!(
                        "{INDEX} points at missing shard '{s}'"
                    )));
                }
            }
            (shards.into_iter().collect(), Some(index), Some(claimed))
        } else if dir.join(SINGLE).is_file() {
            (vec![SINGLE.to_string()], None, None)
        } else {
            return Err(ModelError::Metadata(format!(
                "{}: neither {SINGLE} nor {INDEX}",
                dir.display()
            )));
        };
        let mut dims = HashMap::new();
        let mut sources = Vec::with_capacity(shards.len());
        let mut dropped = BTreeSet::new();
        for s in shards {
            let src = SafetensorsSource::open(&dir.join(&s))?;
            dropped.extend(src.dropped_buffers().iter().cloned());
            for t in src.tensor_infos() {
                if let Some(claimed) = &claimed {
                    if claimed.get(&t.name) != Some(&s) {
                        return Err(ModelError::Metadata(format!(
                            "{INDEX} does not place tensor '{}' in shard '{s}', which holds it",
                            t.name
                        )));
                    }
                }
                if dims.insert(t.name.clone(), t.dims.clone()).is_some() {
                    return Err(ModelError::Metadata(format!(
                        "tensor '{}' is in more than one shard",
                        t.name
                    )));
                }
            }
            sources.push((s, src));
        }
        if let Some(claimed) = &claimed {
            if let Some(name) = claimed
                .keys()
                .find(|n| !dims.contains_key(*n) && !dropped.contains(*n))
            {
                return Err(ModelError::Metadata(format!(
                    "{INDEX} lists tensor '{name}', which no shard holds"
                )));
            }
        }
        // The encrypted checkpoint carries no position-index buffers: its index must not list them.
        let index = index.map(|mut ix| {
            if let Some(Value::Object(map)) = ix.get_mut("weight_map") {
                map.retain(|name, _| !dropped.contains(name));
            }
            ix
        });
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            flat,
            shards: sources,
            index,
            dims,
        })
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &Map<String, Value> {
        &self.config
    }

    /// Shard file names, in order.
    pub fn shards(&self) -> Vec<&str> {
        self.shards.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Whether the checkpoint was written by [`encrypt_hf`].
    pub fn is_encrypted(&self) -> bool {
        self.config.contains_key(CONFIG_KEY)
    }

    /// What an encrypted checkpoint declares about itself (its `config.json` record); errors if
    /// the checkpoint is not encrypted.
    pub fn encrypted_info(&self) -> Result<EncryptedModelInfo, ModelError> {
        let rec = self
            .config
            .get(CONFIG_KEY)
            .ok_or_else(|| ModelError::NotEncrypted(self.dir.display().to_string()))?;
        let field = |k: &str| {
            rec.get(k).and_then(Value::as_str).ok_or_else(|| {
                ModelError::Metadata(format!("config.json: '{CONFIG_KEY}.{k}' is missing"))
            })
        };
        Ok(EncryptedModelInfo {
            fingerprint: KeyFingerprint(field("key_fingerprint")?.to_string()),
            mode: PermMode::parse(field("mode")?)?,
        })
    }
}

impl MetadataSource for HfCheckpoint {
    fn meta_value(&self, key: &str) -> Option<MetaValue<'_>> {
        Some(match self.flat.get(key)? {
            Value::Bool(b) => MetaValue::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => MetaValue::Int(i128::from(i)),
                (_, Some(u), _) => MetaValue::Int(i128::from(u)),
                (_, _, Some(f)) => MetaValue::Float(f),
                _ => return None,
            },
            Value::String(s) => MetaValue::Str(s),
            Value::Array(a) => MetaValue::Array(a.len()),
            Value::Null | Value::Object(_) => return None,
        })
    }

    fn tensor_dims(&self, name: &str) -> Option<Vec<usize>> {
        self.dims.get(name).cloned()
    }
}

/// Maps every special-id key of a config object through the vocabulary permutation (numbers and
/// lists of numbers; `null` stays).
fn map_special_ids(
    obj: &mut Map<String, Value>,
    vocab: &VocabPermutation,
) -> Result<(), ModelError> {
    for key in SPECIAL_ID_KEYS {
        let Some(v) = obj.get_mut(key) else { continue };
        let map_one = |x: &Value| -> Result<Value, ModelError> {
            let id = x
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| {
                    ModelError::Metadata(format!("'{key}' holds {x}, not a token id"))
                })?;
            Ok(json!(vocab.encrypt_id(id)?))
        };
        let mapped = match &*v {
            Value::Null => Value::Null,
            Value::Array(items) => {
                Value::Array(items.iter().map(map_one).collect::<Result<_, _>>()?)
            }
            other => map_one(other)?,
        };
        *v = mapped;
    }
    Ok(())
}

/// The placeholder `tokenizer.json`: a word-level vocabulary `<ctN>` ↦ `N`, nothing else.
fn placeholder_tokenizer(vocab: usize) -> Value {
    let words: Map<String, Value> = (0..vocab)
        .map(|i| (placeholder_token(i), json!(i)))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": placeholder_token(0)},
    })
}

fn write_json(path: &Path, v: &Value) -> Result<(), ModelError> {
    let text =
        serde_json::to_string_pretty(v).map_err(|e| ModelError::Internal(format!("JSON: {e}")))?;
    std::fs::write(path, text + "\n").map_err(|e| ModelError::io(path, e))
}

/// The plan of one checkpoint, by family: LLaMA-shaped decoders or BERT encoders.
enum HfPlan {
    Llama(LlamaPlan),
    Bert(BertPlan),
}

impl HfPlan {
    /// Reads the family's config from `ck` (dispatching on `model_type`) and derives its plan.
    fn derive(key: &SecretKey, ck: &HfCheckpoint, mode: PermMode) -> Result<Self, ModelError> {
        let model_type = ck.config.get("model_type").and_then(Value::as_str);
        if model_type.is_some_and(|t| BERT_MODEL_TYPES.contains(&t)) {
            let config = BertConfig::read(ck).map_err(CoreError::from)?;
            return Ok(HfPlan::Bert(BertPlan::derive(key, config)?));
        }
        let config = HfLlamaFamily.read_config(ck).map_err(|e| match e {
            ConfigError::UnsupportedArchitecture { arch } => ConfigError::UnsupportedArchitecture {
                arch: format!("{arch} (supported model_type: {HF_SUPPORTED})"),
            },
            other => other,
        });
        Ok(HfPlan::Llama(LlamaPlan::derive(
            key,
            config.map_err(CoreError::from)?,
            mode,
        )?))
    }

    fn transform_for(&self, name: &str) -> Result<TensorTransform, CoreError> {
        match self {
            HfPlan::Llama(p) => p.transform_for_role(
                HfLlamaFamily
                    .role_of(name)
                    .ok_or_else(|| CoreError::UnsupportedTensor(name.to_string()))?,
            ),
            HfPlan::Bert(p) => p.transform_for(name),
        }
    }

    fn vocab(&self) -> &VocabPermutation {
        match self {
            HfPlan::Llama(p) => &p.vocab,
            HfPlan::Bert(p) => &p.vocab,
        }
    }

    /// The recorded mode: encoders always draw from the full key space (heads move; outputs
    /// agree to rounding, as any float reordering does).
    fn mode(&self) -> PermMode {
        match self {
            HfPlan::Llama(p) => p.mode,
            HfPlan::Bert(_) => PermMode::Full,
        }
    }

    fn context_length(&self) -> usize {
        match self {
            HfPlan::Llama(p) => p.config.context_length,
            HfPlan::Bert(p) => p.config.max_position,
        }
    }
}

/// `model_type` values [`encrypt_hf`] accepts, for error messages.
const HF_SUPPORTED: &str = "llama, mistral, qwen2, bert";

/// sentence-transformers' module files, copied as they are: they name no token and no model
/// (`modules.json`, the pooling and normalization settings, `sentence_bert_config.json`'s
/// sequence length, `config_sentence_transformers.json`'s library versions). The model card
/// (`README.md`) and training-data lists are not copied.
fn copy_sentence_transformers_files(from: &Path, to: &Path) -> Result<(), ModelError> {
    let modules = from.join("modules.json");
    if !modules.is_file() {
        return Ok(());
    }
    let Value::Array(list) = read_json(&modules)? else {
        return Err(ModelError::Metadata(
            "modules.json is not a JSON array".into(),
        ));
    };
    for f in [
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
    ] {
        if from.join(f).is_file() {
            std::fs::copy(from.join(f), to.join(f))
                .map_err(|e| ModelError::io(&from.join(f), e))?;
        }
    }
    for m in &list {
        let Some(sub) = m.get("path").and_then(Value::as_str) else {
            continue;
        };
        if sub.is_empty() {
            continue;
        }
        if sub.contains('/') || sub.contains('\\') || sub.starts_with('.') {
            return Err(ModelError::Metadata(format!(
                "modules.json: module path '{sub}' is not a plain directory name"
            )));
        }
        let cfg = from.join(sub).join("config.json");
        std::fs::create_dir_all(to.join(sub)).map_err(|e| ModelError::io(&to.join(sub), e))?;
        if cfg.is_file() {
            std::fs::copy(&cfg, to.join(sub).join("config.json"))
                .map_err(|e| ModelError::io(&cfg, e))?;
        }
    }
    Ok(())
}

/// Encrypts the transformers checkpoint directory `input` into the new directory `output`.
///
/// Every shard's transforms are resolved before anything is written (unknown tensors, shapes that
/// disagree with the config and non-float types are errors naming the tensor); shards are then
/// streamed one at a time, each tensor through a bounded buffer
/// ([`crate::encrypt::transform_into`]: peak memory ≈ one 8 MiB chunk plus one row, independent
/// of tensor size).
pub fn encrypt_hf(
    key: &SecretKey,
    input: &Path,
    output: &Path,
    opts: &EncryptOptions,
) -> Result<EncryptReport, ModelError> {
    let start = Instant::now();
    if output.exists() {
        return Err(ModelError::OutputExists(output.display().to_string()));
    }
    let mut ck = HfCheckpoint::open(input)?;
    if ck.is_encrypted() {
        return Err(ModelError::AlreadyEncrypted(input.display().to_string()));
    }
    let plan = HfPlan::derive(key, &ck, opts.mode)?;
    let mut shard_jobs = Vec::with_capacity(ck.shards.len());
    for (name, src) in std::mem::take(&mut ck.shards) {
        let jobs = plan_jobs_by(&src, |n| plan.transform_for(n))?;
        shard_jobs.push((name, src, jobs));
    }
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".equicrypt-")
        .suffix(".tmp")
        .tempdir_in(&parent)
        .map_err(|e| ModelError::io(output, e))?;

    let total: u64 = shard_jobs
        .iter()
        .flat_map(|(_, _, j)| j.iter().map(|(t, _)| t.size))
        .sum();
    let bar = crate::encrypt::progress_bar(total, opts.progress);
    let fingerprint = key.fingerprint();
    let st_meta: HashMap<String, String> = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "equicrypt.key_fingerprint".to_string(),
            fingerprint.0.clone(),
        ),
        (
            "equicrypt.mode".to_string(),
            plan.mode().as_str().to_string(),
        ),
    ]);
    let mut tensors = 0;
    for (name, mut src, jobs) in shard_jobs {
        let headers: Vec<TensorInfo> = jobs.iter().map(|(t, _)| t.clone()).collect();
        let sink = SafetensorsSink::create(&tmp.path().join(&name), &st_meta, headers)?;
        transform_into(&mut src, sink, &jobs, &bar)?;
        tensors += jobs.len();
    }
    bar.finish_and_clear();

    if let Some(index) = &ck.index {
        write_json(&tmp.path().join(INDEX), index)?;
    }
    let mut config = ck.config.clone();
    // `_name_or_path` (4.x) and `_model_name_or_path` (5.x) name the model.
    config.retain(|k, _| !k.contains("name_or_path"));
    map_special_ids(&mut config, plan.vocab())?;
    config.insert(
        CONFIG_KEY.into(),
        json!({
            "format_version": FORMAT_VERSION,
            "key_fingerprint": fingerprint.0,
            "mode": plan.mode().as_str(),
        }),
    );
    write_json(&tmp.path().join("config.json"), &Value::Object(config))?;
    let gen_path = ck.dir.join("generation_config.json");
    if gen_path.exists() {
        let Value::Object(mut gen) = read_json(&gen_path)? else {
            return Err(ModelError::Metadata(
                "generation_config.json is not a JSON object".into(),
            ));
        };
        gen.retain(|k, _| !k.contains("name_or_path"));
        map_special_ids(&mut gen, plan.vocab())?;
        write_json(
            &tmp.path().join("generation_config.json"),
            &Value::Object(gen),
        )?;
    }
    let n = plan.vocab().len();
    write_json(
        &tmp.path().join("tokenizer.json"),
        &placeholder_tokenizer(n),
    )?;
    let name_of = |k: &str| -> Option<String> {
        let id = ck.config.get(k)?.as_u64()?;
        Some(placeholder_token(
            plan.vocab().encrypt_id(u32::try_from(id).ok()?).ok()? as usize,
        ))
    };
    let mut tok_cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": plan.context_length(),
        "clean_up_tokenization_spaces": false,
    });
    for (k, id_key) in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")] {
        if let Some(t) = name_of(id_key) {
            tok_cfg[k] = json!(t);
        }
    }
    write_json(&tmp.path().join("tokenizer_config.json"), &tok_cfg)?;
    copy_sentence_transformers_files(&ck.dir, tmp.path())?;

    let staged = tmp.keep();
    if let Err(e) = std::fs::rename(&staged, output) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(ModelError::io(output, e));
    }
    Ok(EncryptReport {
        tensors,
        bytes: total,
        seconds: start.elapsed().as_secs_f64(),
        fingerprint,
        mode: plan.mode(),
    })
}
