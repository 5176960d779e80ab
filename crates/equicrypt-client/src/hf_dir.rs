//! The client's tokenizer and chat template from a plaintext Hugging Face transformers
//! checkpoint directory: `config.json` and `tokenizer.json` (required), `tokenizer_config.json`,
//! `generation_config.json` and `chat_template.jinja` / `chat_template.json` (optional).
//!
//! * **Tokenizer** ([`GgufTokenizer::from_hf_dir`]): byte-level BPE only (a `BPE` model whose
//!   pre-tokenizer has a `ByteLevel` step: GPT-2, SmolLM, Llama 3, Qwen2, ...). Text between
//!   special tokens runs through `tokenizer.json`'s own normalizer, pre-tokenizer and BPE model
//!   (the `tokenizers` crate, as transformers' fast tokenizer), split on the added tokens the way
//!   a GGUF tokenizer is (special added tokens are control tokens, matched only with
//!   `parse_special`; other added tokens are user-defined, always matched; longest first; their
//!   `lstrip` / `rstrip` / `single_word` flags are not applied). `tokenizer_config.json`'s
//!   `added_tokens_decoder` overrides `tokenizer.json`'s added tokens.
//! * **Vocabulary size**: `config.json`'s `vocab_size` (or `text_config.vocab_size`), which
//!   must cover every id of `tokenizer.json`; ids the tokenizer does not define are unused
//!   (`[PAD{id}]`, decoding to nothing), as llama.cpp's converter pads them.
//! * **Special ids** (ids outside the vocabulary are ignored, as llama.cpp does): BOS / EOS /
//!   unknown are `tokenizer_config.json`'s `bos_token` / `eos_token` / `unk_token` (a string or an
//!   `AddedToken` object) where they name a token, else `config.json`'s `*_token_id`, else
//!   `generation_config.json`'s (the unknown token finally falls back to the BPE model's
//!   `unk_token`); an `eos_token_id` list gives its first id. End-of-generation ids are EOS, every
//!   `eos_token_id` of `config.json` and `generation_config.json` (an integer or a list), plus
//!   llama.cpp's text-based detection (`<|im_end|>`, `<|endoftext|>`, ...), so a checkpoint and
//!   its GGUF conversion stop on the same ids. `add_bos_token` is `tokenizer_config.json`'s, else
//!   whether `tokenizer.json`'s `TemplateProcessing` post-processor starts with a special token.
//! * **Chat template** ([`ChatTemplate::from_hf_dir`]): `chat_template.jinja`, else
//!   `chat_template.json`'s `chat_template`, else `tokenizer_config.json`'s `chat_template` (a
//!   string, or a list of `{name, template}` of which the one named `default` is used), with the
//!   `bos_token` / `eos_token` strings of `tokenizer_config.json` (else the BOS / EOS token
//!   texts).
//!
//! An encrypted checkpoint (`config.json` has an [`HF_ENCRYPTED_CONFIG_KEY`] record; its
//! tokenizer is a placeholder) is refused. Every error names the file it concerns.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};
use tokenizers::models::ModelWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::Tokenizer;

use crate::template::ChatTemplate;
use crate::tokenizer::{ExplicitSpecials, GgufTokenizer, TokenAttr};
use crate::{ClientError, Result};

/// Key of the equicrypt record in an *encrypted* checkpoint's `config.json` (the same key
/// `equicrypt encrypt` writes); a directory whose `config.json` has it is refused.
pub const HF_ENCRYPTED_CONFIG_KEY: &str = "equicrypt";

const CONFIG: &str = "config.json";
const TOKENIZER: &str = "tokenizer.json";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
const GENERATION_CONFIG: &str = "generation_config.json";
const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";
const CHAT_TEMPLATE_JSON: &str = "chat_template.json";

/// Largest `vocab_size` accepted (real vocabularies have at most a few hundred thousand tokens;
/// this only stops a corrupt config from allocating gigabytes).
const MAX_VOCAB: u64 = 1 << 24;

fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn read_err(path: &Path, reason: impl std::fmt::Display) -> ClientError {
    ClientError::HfFileRead {
        path: path.display().to_string(),
        reason: one_line(reason),
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> ClientError {
    ClientError::BadHfFile {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn unsupported(path: &Path, reason: impl Into<String>) -> ClientError {
    ClientError::UnsupportedHfTokenizer {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| read_err(path, e))
}

fn parse_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&read_text(path)?)
        .map_err(|e| read_err(path, format!("not valid JSON ({e})")))
}

/// `dir/file` parsed as a JSON object; `None` when the file does not exist.
fn read_object(dir: &Path, file: &str) -> Result<Option<Map<String, Value>>> {
    let path = dir.join(file);
    if !path.exists() {
        return Ok(None);
    }
    match parse_json(&path)? {
        Value::Object(m) => Ok(Some(m)),
        _ => Err(bad(&path, "expected a JSON object")),
    }
}

fn missing(dir: &Path, file: &str) -> ClientError {
    ClientError::HfFileMissing {
        dir: dir.display().to_string(),
        file: file.to_string(),
    }
}

/// Checks that `dir` is a directory and returns its `config.json`, refusing an encrypted
/// checkpoint.
fn plaintext_config(dir: &Path) -> Result<Map<String, Value>> {
    if !dir.is_dir() {
        return Err(read_err(dir, "not a directory"));
    }
    let config = read_object(dir, CONFIG)?.ok_or_else(|| missing(dir, CONFIG))?;
    if config.contains_key(HF_ENCRYPTED_CONFIG_KEY) {
        return Err(ClientError::EncryptedHfCheckpoint {
            dir: dir.display().to_string(),
        });
    }
    Ok(config)
}

/// A key of `config.json`, or of its `text_config` (multimodal checkpoints); `null` is absent.
fn config_value<'c>(config: &'c Map<String, Value>, key: &str) -> Option<&'c Value> {
    let get = |m: &'c Map<String, Value>| m.get(key).filter(|v| !v.is_null());
    get(config).or_else(|| config.get("text_config")?.as_object().and_then(get))
}

/// A special-id entry: an integer or a list of integers (`null`/absent: none). Integers outside
/// `u32` are dropped (ignored later like any out-of-range id).
fn ids_of(path: &Path, key: &str, v: Option<&Value>) -> Result<Vec<u32>> {
    let one = |v: &Value| -> Result<Option<u32>> {
        if let Some(i) = v.as_i64() {
            return Ok(u32::try_from(i).ok());
        }
        if v.as_u64().is_some() {
            return Ok(None);
        }
        Err(bad(
            path,
            format!("'{key}' must be an integer or a list of integers, found {v}"),
        ))
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items
            .iter()
            .map(one)
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect()),
        Some(v) => Ok(one(v)?.into_iter().collect()),
    }
}

/// A token string of `tokenizer_config.json` (`bos_token`, ...): a string or an `AddedToken`
/// object with `content`; `null`/absent: none.
fn token_string(
    path: &Path,
    cfg: Option<&Map<String, Value>>,
    key: &str,
) -> Result<Option<String>> {
    match cfg.and_then(|c| c.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(bad(path, format!("'{key}' has no 'content' string"))),
        },
        Some(_) => Err(bad(
            path,
            format!("'{key}' must be a string or an object with 'content'"),
        )),
    }
}

/// One added token: id, content, special.
type Added = (u32, String, bool);

/// `tokenizer.json`'s `added_tokens` list.
fn added_tokens(path: &Path, v: Option<&Value>) -> Result<Vec<Added>> {
    let items = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(bad(path, "'added_tokens' must be a list")),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let id = t
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| bad(path, format!("added token #{i} has no valid 'id'")))?;
            let content = t
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(path, format!("added token {id} has no 'content' string")))?;
            let special = t.get("special").and_then(Value::as_bool).unwrap_or(false);
            Ok((id, content.to_string(), special))
        })
        .collect()
}

/// `tokenizer_config.json`'s `added_tokens_decoder` (`{"<id>": {"content", "special"}}`).
fn added_tokens_decoder(path: &Path, cfg: Option<&Map<String, Value>>) -> Result<Vec<Added>> {
    let map = match cfg.and_then(|c| c.get("added_tokens_decoder")) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(bad(path, "'added_tokens_decoder' must be an object")),
    };
    let mut out =
        map.iter()
            .map(|(k, t)| {
                let id: u32 = k.parse().map_err(|_| {
                    bad(path, format!("added_tokens_decoder key {k:?} is not an id"))
                })?;
                let content = t.get("content").and_then(Value::as_str).ok_or_else(|| {
                    bad(path, format!("added token {id} has no 'content' string"))
                })?;
                let special = t.get("special").and_then(Value::as_bool).unwrap_or(false);
                Ok((id, content.to_string(), special))
            })
            .collect::<Result<Vec<_>>>()?;
    out.sort_by_key(|t| t.0);
    Ok(out)
}

/// Whether a `post_processor` adds a BOS: a `TemplateProcessing` (alone or in a `Sequence`)
/// whose single-sequence template starts with a special token.
fn post_processor_adds_bos(v: Option<&Value>) -> bool {
    let Some(v) = v else { return false };
    match v.get("type").and_then(Value::as_str) {
        Some("TemplateProcessing") => v
            .get("single")
            .and_then(Value::as_array)
            .and_then(|s| s.first())
            .is_some_and(|p| p.get("SpecialToken").is_some()),
        Some("Sequence") => v
            .get("processors")
            .and_then(Value::as_array)
            .is_some_and(|ps| ps.iter().any(|p| post_processor_adds_bos(Some(p)))),
        _ => false,
    }
}

fn has_byte_level(pt: &PreTokenizerWrapper) -> bool {
    match pt {
        PreTokenizerWrapper::ByteLevel(_) => true,
        PreTokenizerWrapper::Sequence(seq) => seq.as_ref().iter().any(has_byte_level),
        _ => false,
    }
}

/// `tokenizer.json` without its added tokens and post-processor (the partition handles the
/// former, callers add BOS themselves), its added tokens, and whether its post-processor adds a
/// BOS.
fn load_tokenizer_json(dir: &Path) -> Result<(Tokenizer, Vec<Added>, bool)> {
    let path = dir.join(TOKENIZER);
    if !path.exists() {
        return Err(missing(dir, TOKENIZER));
    }
    let mut json = parse_json(&path)?;
    let Value::Object(obj) = &mut json else {
        return Err(bad(&path, "expected a JSON object"));
    };
    let added = added_tokens(&path, obj.get("added_tokens"))?;
    let pp_bos = post_processor_adds_bos(obj.get("post_processor"));
    obj.insert("added_tokens".into(), Value::Array(Vec::new()));
    for key in ["post_processor", "truncation", "padding"] {
        obj.insert(key.into(), Value::Null);
    }
    let raw: Tokenizer = serde_json::from_value(json).map_err(|e| {
        bad(
            &path,
            format!("not a tokenizers tokenizer ({})", one_line(e)),
        )
    })?;
    match raw.get_model() {
        ModelWrapper::BPE(bpe) => {
            let affix = |a: &Option<String>| a.as_deref().is_some_and(|s| !s.is_empty());
            if affix(&bpe.continuing_subword_prefix) || affix(&bpe.end_of_word_suffix) {
                return Err(unsupported(
                    &path,
                    "BPE with a continuing-subword prefix or end-of-word suffix",
                ));
            }
            if bpe.dropout.is_some_and(|p| p > 0.0) {
                return Err(unsupported(&path, "BPE dropout (tokenization is random)"));
            }
        }
        ModelWrapper::WordPiece(_) => return Err(unsupported(&path, "a WordPiece model")),
        ModelWrapper::WordLevel(_) => return Err(unsupported(&path, "a WordLevel model")),
        ModelWrapper::Unigram(_) => return Err(unsupported(&path, "a Unigram model")),
    }
    if !raw.get_pre_tokenizer().is_some_and(has_byte_level) {
        return Err(unsupported(
            &path,
            "BPE without a ByteLevel pre-tokenizer (e.g. SentencePiece-style byte fallback)",
        ));
    }
    Ok((raw, added, pp_bos))
}

impl GgufTokenizer {
    /// Builds the tokenizer of a plaintext Hugging Face transformers checkpoint directory
    /// (`config.json` and `tokenizer.json` required; `tokenizer_config.json` and
    /// `generation_config.json` read when present). Byte-level BPE only (a `BPE` model whose
    /// pre-tokenizer has a `ByteLevel` step).
    ///
    /// * Text between special tokens is tokenized by `tokenizer.json`'s own normalizer,
    ///   pre-tokenizer and BPE model (the `tokenizers` crate, as transformers' fast tokenizer);
    ///   added tokens are partitioned out first as for a GGUF (longest first; their `lstrip` /
    ///   `rstrip` / `single_word` flags are not applied). `tokenizer_config.json`'s
    ///   `added_tokens_decoder` overrides `tokenizer.json`'s added tokens.
    /// * The vocabulary size is `config.json`'s `vocab_size` (or `text_config.vocab_size`), at
    ///   least the tokenizer's size; ids the tokenizer does not define are unused (`[PAD{id}]`,
    ///   decoding to nothing).
    /// * BOS / EOS / unknown: `tokenizer_config.json`'s `bos_token` / `eos_token` / `unk_token`
    ///   where they name a token, else `config.json`'s `*_token_id`, else
    ///   `generation_config.json`'s (unknown: finally the BPE model's `unk_token`); of an id list,
    ///   the first. End of generation: EOS, every `eos_token_id` of `config.json` and
    ///   `generation_config.json` (an integer or a list), and llama.cpp's text-based detection
    ///   (`<|im_end|>`, `<|endoftext|>`, ...), so a checkpoint and its GGUF conversion stop on
    ///   the same ids. Ids outside the vocabulary are ignored, as llama.cpp does.
    /// * [`add_bos_token`](Self::add_bos_token): `tokenizer_config.json`'s `add_bos_token`, else
    ///   whether `tokenizer.json`'s `TemplateProcessing` post-processor starts with a special
    ///   token.
    ///
    /// The result behaves like one built from a GGUF: [`model`](Self::model) is
    /// [`TokenizerModel::Bpe`](crate::TokenizerModel::Bpe),
    /// [`pre_tokenizer`](Self::pre_tokenizer) is
    /// [`PreTokenizerKind::TokenizerJson`](crate::PreTokenizerKind::TokenizerJson), special
    /// added tokens are [`TokenAttr::Control`], other added tokens [`TokenAttr::UserDefined`],
    /// ids past the tokenizer's end [`TokenAttr::Unused`].
    ///
    /// Errors (one line each, naming the file): [`ClientError::EncryptedHfCheckpoint`] for an
    /// encrypted checkpoint, [`ClientError::HfFileMissing`] without `config.json` or
    /// `tokenizer.json`, [`ClientError::HfFileRead`] for unreadable files or invalid JSON,
    /// [`ClientError::BadHfFile`] for unusable contents, [`ClientError::UnsupportedHfTokenizer`]
    /// for a tokenizer that is not byte-level BPE.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = plaintext_config(dir)?;
        let config_path = dir.join(CONFIG);
        let tc_path = dir.join(TOKENIZER_CONFIG);
        let gen_path = dir.join(GENERATION_CONFIG);
        let tok_path = dir.join(TOKENIZER);
        let tc = read_object(dir, TOKENIZER_CONFIG)?;
        let gen = read_object(dir, GENERATION_CONFIG)?;
        let (raw, added, pp_bos) = load_tokenizer_json(dir)?;

        let model_vocab = raw.get_vocab(false);
        let tok_size = model_vocab
            .values()
            .chain(added.iter().map(|a| &a.0))
            .max()
            .map_or(0, |&m| m as usize + 1);
        if tok_size == 0 {
            return Err(bad(&tok_path, "the vocabulary is empty"));
        }
        let n = match config_value(&config, "vocab_size") {
            None => return Err(bad(&config_path, "'vocab_size' is missing")),
            Some(v) => v
                .as_u64()
                .filter(|&v| (1..=MAX_VOCAB).contains(&v))
                .ok_or_else(|| {
                    bad(
                        &config_path,
                        format!("'vocab_size' must be an integer in 1..={MAX_VOCAB}, found {v}"),
                    )
                })? as usize,
        };
        if n < tok_size {
            return Err(bad(
                &config_path,
                format!(
                    "vocab_size {n} is smaller than the tokenizer ({tok_size} ids in {TOKENIZER})"
                ),
            ));
        }

        let mut texts: Vec<Option<String>> = vec![None; n];
        let mut attrs = vec![TokenAttr::Unused; n];
        for (text, &id) in &model_vocab {
            let slot = &mut texts[id as usize];
            if slot.is_some() {
                return Err(bad(
                    &tok_path,
                    format!("id {id} appears twice in the vocabulary"),
                ));
            }
            *slot = Some(text.clone());
            attrs[id as usize] = TokenAttr::Normal;
        }
        // Added tokens override the vocabulary's text at their id (as transformers decodes them).
        let decoder = added_tokens_decoder(&tc_path, tc.as_ref())?;
        for (path, list) in [(&tok_path, &added), (&tc_path, &decoder)] {
            for (id, content, special) in list {
                let i = *id as usize;
                if i >= n {
                    return Err(bad(
                        path,
                        format!("added token {id} is outside the vocabulary (vocab_size {n})"),
                    ));
                }
                texts[i] = Some(content.clone());
                attrs[i] = if *special {
                    TokenAttr::Control
                } else {
                    TokenAttr::UserDefined
                };
            }
        }
        let texts: Vec<String> = texts
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
            .collect();
        let mut index: HashMap<&str, u32> = HashMap::with_capacity(n);
        for (i, t) in texts.iter().enumerate() {
            if let Some(j) = index.insert(t.as_str(), i as u32) {
                return Err(bad(
                    &tok_path,
                    format!("token text {t:?} has two ids ({j} and {i})"),
                ));
            }
        }

        let by_text = |s: Option<String>| s.and_then(|s| index.get(s.as_str()).copied());
        let first = |ids: &[u32]| ids.iter().copied().find(|&i| (i as usize) < n);
        let cfg_ids = |key: &str| ids_of(&config_path, key, config_value(&config, key));
        let gen_ids = |key: &str| ids_of(&gen_path, key, gen.as_ref().and_then(|g| g.get(key)));
        let (cfg_bos, gen_bos) = (cfg_ids("bos_token_id")?, gen_ids("bos_token_id")?);
        let (cfg_eos, gen_eos) = (cfg_ids("eos_token_id")?, gen_ids("eos_token_id")?);
        let cfg_unk = cfg_ids("unk_token_id")?;
        let bos = by_text(token_string(&tc_path, tc.as_ref(), "bos_token")?)
            .or_else(|| first(&cfg_bos))
            .or_else(|| first(&gen_bos));
        let eos = by_text(token_string(&tc_path, tc.as_ref(), "eos_token")?)
            .or_else(|| first(&cfg_eos))
            .or_else(|| first(&gen_eos));
        let bpe_unk = match raw.get_model() {
            ModelWrapper::BPE(bpe) => bpe.unk_token.clone(),
            _ => None,
        };
        let unk = by_text(token_string(&tc_path, tc.as_ref(), "unk_token")?)
            .or_else(|| first(&cfg_unk))
            .or_else(|| by_text(bpe_unk));

        let add_bos = match tc.as_ref().and_then(|c| c.get("add_bos_token")) {
            None | Some(Value::Null) => pp_bos,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(bad(
                    &tc_path,
                    format!("'add_bos_token' must be a boolean, found {v}"),
                ))
            }
        };
        let explicit = ExplicitSpecials {
            bos,
            eos,
            unk,
            extra_eog: cfg_eos.into_iter().chain(gen_eos).collect(),
            ..ExplicitSpecials::default()
        };
        Ok(Self::from_byte_level_parts(
            raw, texts, attrs, explicit, add_bos,
        ))
    }
}

/// A `chat_template` entry: a string, or a list of `{name, template}` (the `default` one).
fn template_entry(path: &Path, v: Option<&Value>) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let mut names = Vec::new();
            for t in list {
                let name = t.get("name").and_then(Value::as_str);
                let template = t.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(name), Some(_)) => names.push(name.to_string()),
                    _ => {
                        return Err(bad(
                            path,
                            "'chat_template' list entries need 'name' and 'template' strings",
                        ))
                    }
                }
            }
            Err(bad(
                path,
                format!(
                    "'chat_template' lists no 'default' template (only: {})",
                    names.join(", ")
                ),
            ))
        }
        Some(_) => Err(bad(path, "'chat_template' must be a string or a list")),
    }
}

impl ChatTemplate {
    /// The chat template of a plaintext Hugging Face checkpoint directory, `None` when it has
    /// none: `chat_template.jinja`, else `chat_template.json`'s `chat_template`, else
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}`
    /// whose `default` entry is used). The template sees `tokenizer_config.json`'s `bos_token` /
    /// `eos_token` strings, else the texts of `tok`'s BOS / EOS tokens (else empty strings).
    ///
    /// Refuses an encrypted checkpoint like [`GgufTokenizer::from_hf_dir`]; a template that
    /// does not compile is a [`ClientError::Template`] naming its file.
    pub fn from_hf_dir(dir: impl AsRef<Path>, tok: &GgufTokenizer) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        plaintext_config(dir)?;
        let tc_path = dir.join(TOKENIZER_CONFIG);
        let tc = read_object(dir, TOKENIZER_CONFIG)?;
        let jinja = dir.join(CHAT_TEMPLATE_JINJA);
        let json = dir.join(CHAT_TEMPLATE_JSON);
        let (source, from) = if jinja.exists() {
            (Some(read_text(&jinja)?), jinja)
        } else if json.exists() {
            let obj = read_object(dir, CHAT_TEMPLATE_JSON)?.unwrap_or_default();
            (template_entry(&json, obj.get("chat_template"))?, json)
        } else {
            let v = tc.as_ref().and_then(|c| c.get("chat_template"));
            (template_entry(&tc_path, v)?, tc_path.clone())
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let text_of = |id: Option<u32>| {
            id.and_then(|i| tok.token_text(i))
                .map(str::to_string)
                .unwrap_or_default()
        };
        let bos = token_string(&tc_path, tc.as_ref(), "bos_token")?
            .unwrap_or_else(|| text_of(tok.bos_id()));
        let eos = token_string(&tc_path, tc.as_ref(), "eos_token")?
            .unwrap_or_else(|| text_of(tok.eos_id()));
        match Self::new(source, bos, eos) {
            Ok(t) => Ok(Some(t)),
            Err(ClientError::Template(e)) => Err(ClientError::Template(format!(
                "{}: {}",
                from.display(),
                one_line(e)
            ))),
            Err(e) => Err(e),
        }
    }
}
