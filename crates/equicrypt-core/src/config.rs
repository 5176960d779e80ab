//! Model configuration and the one reader of format metadata.
//!
//! A format (GGUF today, a safetensors `config.json` tomorrow) exposes its key/value metadata and
//! its tensor shapes through [`MetadataSource`]; the typed readers below ([`meta_str`],
//! [`meta_usize`], [`meta_f32`] and their optional variants) are the only code that turns a
//! metadata value into a number or a string. Each family (see [`crate::families`]) builds its
//! config type from them; [`LlamaConfig`] is the LLaMA family's, shared by the transform plan, the
//! encrypter, the engine, re-keying and the attack lab.

use crate::QUANT_BLOCK;

/// One metadata value, as the readers see it.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum MetaValue<'a> {
    /// Any integer type (widened without loss).
    Int(i128),
    /// Any float type.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(&'a str),
    /// An array of `n` values (the readers never need its items).
    Array(usize),
}

impl MetaValue<'_> {
    /// The kind of value, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            MetaValue::Int(_) => "an integer",
            MetaValue::Float(_) => "a float",
            MetaValue::Bool(_) => "a boolean",
            MetaValue::Str(_) => "a string",
            MetaValue::Array(_) => "an array",
        }
    }
}

/// Read access to a model file's metadata and tensor shapes, independent of the file format.
pub trait MetadataSource {
    /// The value stored under `key`, if any.
    fn meta_value(&self, key: &str) -> Option<MetaValue<'_>>;
    /// The shape of tensor `name` (outermost first), if the file has it.
    fn tensor_dims(&self, name: &str) -> Option<Vec<usize>>;
}

/// Why a configuration could not be read from metadata.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required metadata key is absent.
    #[error("missing metadata key '{key}'")]
    MissingMetadata {
        /// The key that was looked up.
        key: String,
    },
    /// A metadata key has the wrong type or an unusable value.
    #[error("invalid metadata '{key}': {reason}")]
    InvalidMetadata {
        /// The offending key.
        key: String,
        /// Why the value was rejected.
        reason: String,
    },
    /// The file's architecture is not the family's.
    #[error("unsupported architecture '{arch}'")]
    UnsupportedArchitecture {
        /// The architecture found in the file.
        arch: String,
    },
    /// A tensor the configuration is read from is absent.
    #[error("missing tensor '{name}'")]
    MissingTensor {
        /// Tensor name.
        name: String,
    },
    /// A tensor's shape disagrees with the metadata.
    #[error("tensor '{name}' has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// Tensor name.
        name: String,
        /// Shape implied by the metadata (outermost first, 0 = any).
        expected: Vec<usize>,
        /// Shape found.
        actual: Vec<usize>,
    },
    /// The hyper-parameters are inconsistent.
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
}

fn missing(key: &str) -> ConfigError {
    ConfigError::MissingMetadata {
        key: key.to_string(),
    }
}

fn invalid(key: &str, reason: String) -> ConfigError {
    ConfigError::InvalidMetadata {
        key: key.to_string(),
        reason,
    }
}

/// An optional string value.
pub fn opt_meta_str(src: &dyn MetadataSource, key: &str) -> Result<Option<String>, ConfigError> {
    match src.meta_value(key) {
        None => Ok(None),
        Some(MetaValue::Str(s)) => Ok(Some(s.to_string())),
        Some(v) => Err(invalid(
            key,
            format!("expected a string, found {}", v.kind()),
        )),
    }
}

/// A required string value.
pub fn meta_str(src: &dyn MetadataSource, key: &str) -> Result<String, ConfigError> {
    opt_meta_str(src, key)?.ok_or_else(|| missing(key))
}

/// An optional non-negative integer value (any integer width).
pub fn opt_meta_u64(src: &dyn MetadataSource, key: &str) -> Result<Option<u64>, ConfigError> {
    match src.meta_value(key) {
        None => Ok(None),
        Some(MetaValue::Int(n)) => u64::try_from(n)
            .map(Some)
            .map_err(|_| invalid(key, format!("{n} is not an unsigned integer"))),
        Some(v) => Err(invalid(
            key,
            format!("expected an integer, found {}", v.kind()),
        )),
    }
}

/// A required non-negative integer value (any integer width).
pub fn meta_u64(src: &dyn MetadataSource, key: &str) -> Result<u64, ConfigError> {
    opt_meta_u64(src, key)?.ok_or_else(|| missing(key))
}

/// An optional size.
pub fn opt_meta_usize(src: &dyn MetadataSource, key: &str) -> Result<Option<usize>, ConfigError> {
    opt_meta_u64(src, key)?
        .map(|n| usize::try_from(n).map_err(|_| invalid(key, format!("{n} is not a valid size"))))
        .transpose()
}

/// A required size.
pub fn meta_usize(src: &dyn MetadataSource, key: &str) -> Result<usize, ConfigError> {
    opt_meta_usize(src, key)?.ok_or_else(|| missing(key))
}

/// An optional float value (F32 or F64; an integer is widened, as JSON writes `100000` for
/// `100000.0`).
pub fn opt_meta_f32(src: &dyn MetadataSource, key: &str) -> Result<Option<f32>, ConfigError> {
    match src.meta_value(key) {
        None => Ok(None),
        Some(MetaValue::Float(x)) => Ok(Some(x as f32)),
        Some(MetaValue::Int(n)) => Ok(Some(n as f32)),
        Some(v) => Err(invalid(
            key,
            format!("expected a float, found {}", v.kind()),
        )),
    }
}

/// A required float value (F32 or F64).
pub fn meta_f32(src: &dyn MetadataSource, key: &str) -> Result<f32, ConfigError> {
    opt_meta_f32(src, key)?.ok_or_else(|| missing(key))
}

/// Hyper-parameters of a LLaMA-family model: the one config type of the family, read by
/// [`crate::families::LlamaFamily`] and used by the transform plan and the engine alike.
///
/// It is also the decoder *shape* other families build on (see [`Gemma3Config`]): the transform
/// plan needs nothing more.
///
/// Invariants (checked by [`LlamaConfig::validate`]): `n_head % n_kv_head == 0`, `head_dim` is
/// even, every size is non-zero. The query width `n_head * head_dim` is usually `d_model` but
/// need not be (Gemma 3 270M: 4 × 256 = 1024 against 640). The transform plan additionally needs
/// [`LlamaConfig::validate_for_plan`].
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Number of transformer blocks (`llama.block_count`).
    pub n_layer: usize,
    /// Width of the residual stream (`llama.embedding_length`).
    pub d_model: usize,
    /// Width of the SwiGLU intermediate layer (`llama.feed_forward_length`).
    pub d_ff: usize,
    /// Query heads (`llama.attention.head_count`).
    pub n_head: usize,
    /// Key/value heads (`llama.attention.head_count_kv`, defaults to `n_head`).
    pub n_kv_head: usize,
    /// Dimension of one head (`d_model / n_head` unless the format says otherwise, e.g. GGUF
    /// `*.attention.key_length`).
    pub head_dim: usize,
    /// Number of token ids: rows of the token embedding.
    pub vocab_size: usize,
    /// Maximum number of positions (`llama.context_length`).
    pub context_length: usize,
    /// RoPE base frequency (`llama.rope.freq_base`, default 10000).
    pub rope_base: f32,
    /// RMSNorm epsilon (`llama.attention.layer_norm_rms_epsilon`).
    pub rms_eps: f32,
    /// Which head dimensions RoPE rotates together.
    pub rope_layout: RopeLayout,
    /// Linear RoPE scaling: positions are divided by this (`*.rope.scaling.factor` with
    /// `*.rope.scaling.type = linear`; 1 = none). Gemma 3 applies it to its global layers only.
    pub rope_scale: f32,
}

/// Which head dimensions RoPE rotates as a pair (see `docs/ee-math.md`, "RoPE pairing by format").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RopeLayout {
    /// Adjacent pairs `(2i, 2i + 1)`: GGUF `llama` (llama.cpp's converter reorders HF rows so).
    #[default]
    Interleaved,
    /// NeoX pairs `(i, i + d/2)`: Hugging Face checkpoints, GGUF `gemma3`, `qwen2`.
    HalfSplit,
}

impl RopeLayout {
    /// The pair index (frequency index) of head dimension `j` in a head of `head_dim`.
    pub fn pair_of(self, j: usize, head_dim: usize) -> usize {
        match self {
            RopeLayout::Interleaved => j / 2,
            RopeLayout::HalfSplit => j % (head_dim / 2),
        }
    }
}

/// Hyper-parameters of a Gemma 3 decoder (GGUF `gemma3`): the LLaMA shape plus what Gemma 3 adds.
///
/// Gemma 3 scales the embedding by `sqrt(d_model)`, normalizes Q and K per head (RMSNorm with
/// gains `attn_q_norm`/`attn_k_norm`) before RoPE, adds RMSNorms after attention and after the
/// FFN (`post_attention_norm`, `post_ffw_norm`), uses GeGLU (tanh GELU) and interleaves
/// sliding-window layers with global ones. Norm gains in GGUF already include Gemma's `1 + w`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Config {
    /// Shape, RoPE base of the global layers, norm epsilon (RoPE layout: half-split).
    pub base: LlamaConfig,
    /// Sliding-window length of the local layers (`gemma3.attention.sliding_window`).
    pub sliding_window: usize,
    /// Every `swa_pattern`-th layer (1-based) is global, the others local (llama.cpp: 6).
    pub swa_pattern: usize,
    /// RoPE base of the local layers (llama.cpp: 10000; never scaled).
    pub rope_base_local: f32,
    /// Query scale applied before attention (`1/sqrt(head_dim)`, as llama.cpp for all but 27B).
    pub query_scale: f32,
}

impl Gemma3Config {
    /// Whether layer `l` attends only to the last [`Gemma3Config::sliding_window`] positions.
    pub fn is_local(&self, l: usize) -> bool {
        !(l + 1).is_multiple_of(self.swa_pattern)
    }
}

/// The configuration of any supported decoder, as read from a file by its family's reader.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ModelConfig {
    /// GGUF `llama` (SmolLM2, TinyLlama, Llama 2/3, Mistral).
    Llama(LlamaConfig),
    /// GGUF `gemma3`.
    Gemma3(Gemma3Config),
    /// GGUF `qwen2` (Qwen2, Qwen2.5): the LLaMA shape with Q/K/V biases and NeoX RoPE.
    Qwen2(LlamaConfig),
}

impl ModelConfig {
    /// The decoder shape the transform plan is derived from.
    pub fn base(&self) -> &LlamaConfig {
        match self {
            ModelConfig::Llama(c) | ModelConfig::Qwen2(c) => c,
            ModelConfig::Gemma3(c) => &c.base,
        }
    }

    /// Mutable access to the shape (e.g. to bound the context length).
    pub fn base_mut(&mut self) -> &mut LlamaConfig {
        match self {
            ModelConfig::Llama(c) | ModelConfig::Qwen2(c) => c,
            ModelConfig::Gemma3(c) => &mut c.base,
        }
    }

    /// The GGUF architecture name.
    pub fn arch(&self) -> &'static str {
        match self {
            ModelConfig::Llama(_) => "llama",
            ModelConfig::Gemma3(_) => "gemma3",
            ModelConfig::Qwen2(_) => "qwen2",
        }
    }
}

impl LlamaConfig {
    /// Checks the invariants listed on the type.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::InvalidConfig(m));
        if self.n_layer == 0
            || self.d_model == 0
            || self.d_ff == 0
            || self.n_head == 0
            || self.n_kv_head == 0
            || self.vocab_size == 0
            || self.context_length == 0
        {
            return bad(format!("all sizes must be non-zero: {self:?}"));
        }
        if self.head_dim == 0 {
            return bad("head_dim must be non-zero".into());
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad(format!(
                "n_head {} is not a multiple of n_kv_head {}",
                self.n_head, self.n_kv_head
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad(format!("rms_eps {} must be finite and >= 0", self.rms_eps));
        }
        if !(self.rope_scale.is_finite() && self.rope_scale > 0.0) {
            return bad(format!(
                "RoPE scaling factor {} must be finite and > 0",
                self.rope_scale
            ));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            return bad(format!(
                "rope_base {} must be finite and > 0",
                self.rope_base
            ));
        }
        Ok(())
    }

    /// Checks the constraints the transform plan relies on (block-aligned widths).
    pub fn validate_for_plan(&self) -> Result<(), crate::CoreError> {
        let bad = |m: String| Err(crate::CoreError::UnsupportedShape(m));
        if self.n_head == 0 || self.n_kv_head == 0 || self.n_layer == 0 || self.vocab_size == 0 {
            return bad("zero-sized model".into());
        }
        if self.head_dim == 0 {
            return bad("head_dim is zero".into());
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad(format!(
                "n_head {} is not a multiple of n_kv_head {}",
                self.n_head, self.n_kv_head
            ));
        }
        for (what, v) in [
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("head_dim", self.head_dim),
        ] {
            if v % QUANT_BLOCK != 0 {
                return bad(format!("{what} {v} is not a multiple of {QUANT_BLOCK}"));
            }
        }
        Ok(())
    }

    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.n_head / self.n_kv_head
    }

    /// Width of the key/value projections, `n_kv_head * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// Width of the query projection (and the attention output's input), `n_head * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
}

/// Reads the linear RoPE scaling factor under `prefix` (`{prefix}.rope.scaling.type` and
/// `.factor`): 1 when absent or `none`; other scaling types are refused.
pub fn read_linear_rope_scale(src: &dyn MetadataSource, prefix: &str) -> Result<f32, ConfigError> {
    let ty = format!("{prefix}.rope.scaling.type");
    match opt_meta_str(src, &ty)?.as_deref() {
        None | Some("none") => Ok(1.0),
        Some("linear") => meta_f32(src, &format!("{prefix}.rope.scaling.factor")),
        Some(other) => Err(invalid(
            &ty,
            format!("RoPE scaling '{other}' is not supported (only linear)"),
        )),
    }
}

/// The number of rows (the vocabulary size) of the embedding tensor `name`, checking that it is
/// `[rows, d_model]`.
pub fn embedding_rows(
    src: &dyn MetadataSource,
    name: &str,
    d_model: usize,
) -> Result<usize, ConfigError> {
    let dims = src
        .tensor_dims(name)
        .ok_or_else(|| ConfigError::MissingTensor { name: name.into() })?;
    if dims.len() != 2 || dims[1] != d_model {
        return Err(ConfigError::TensorShape {
            name: name.into(),
            expected: vec![0, d_model],
            actual: dims,
        });
    }
    Ok(dims[0])
}
