//! Model families: how a format names a family's tensors, and how its configuration is read.
//!
//! A transform plan speaks of tensors by [`TensorRole`] ("the query projection of layer 3"),
//! never by a file's tensor name. Each family is one file in this module implementing
//! [`ArchFamily`]: the map from its tensor names to roles and back, and the reader of its config
//! type from a [`MetadataSource`]. `docs/new-family.md` is the recipe for adding one.

mod gemma3;
mod hf_llama;
mod llama;
mod qwen2;

pub use gemma3::Gemma3Family;
pub use hf_llama::{HfLlamaFamily, HF_MODEL_TYPES};
pub use llama::LlamaFamily;
pub use qwen2::Qwen2Family;

use crate::config::{meta_str, ConfigError, MetadataSource, ModelConfig};

/// What a tensor is for, independent of how a file format names it. Per-layer roles carry the
/// layer index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TensorRole {
    /// The token embedding (vocabulary × d_model).
    TokenEmbedding,
    /// The untied output head (vocabulary × d_model).
    Output,
    /// The final RMSNorm gain.
    OutputNorm,
    /// Precomputed RoPE frequency factors: carried unchanged.
    RopeFreqs,
    /// The RMSNorm gain before attention.
    AttnNorm(usize),
    /// The RMSNorm gain before the FFN.
    FfnNorm(usize),
    /// The RMSNorm gain applied to the attention output before the residual add (Gemma 2/3).
    PostAttnNorm(usize),
    /// The RMSNorm gain applied to the FFN output before the residual add (Gemma 2/3).
    PostFfnNorm(usize),
    /// Query projection weight.
    AttnQ(usize),
    /// Key projection weight.
    AttnK(usize),
    /// Value projection weight.
    AttnV(usize),
    /// Attention output projection weight.
    AttnOutput(usize),
    /// Query projection bias.
    AttnQBias(usize),
    /// Key projection bias.
    AttnKBias(usize),
    /// Value projection bias.
    AttnVBias(usize),
    /// Per-head RMSNorm gain on queries.
    AttnQNorm(usize),
    /// Per-head RMSNorm gain on keys.
    AttnKNorm(usize),
    /// FFN gate projection.
    FfnGate(usize),
    /// FFN up projection.
    FfnUp(usize),
    /// FFN down projection.
    FfnDown(usize),
}

impl TensorRole {
    /// The layer of a per-layer role.
    pub fn layer(&self) -> Option<usize> {
        use TensorRole::*;
        match *self {
            TokenEmbedding | Output | OutputNorm | RopeFreqs => None,
            AttnNorm(l) | FfnNorm(l) | PostAttnNorm(l) | PostFfnNorm(l) | AttnQ(l) | AttnK(l)
            | AttnV(l) | AttnOutput(l) | AttnQBias(l) | AttnKBias(l) | AttnVBias(l)
            | AttnQNorm(l) | AttnKNorm(l) | FfnGate(l) | FfnUp(l) | FfnDown(l) => Some(l),
        }
    }
}

/// One model family in one file format: tensor names ↔ roles, and the config reader.
pub trait ArchFamily {
    /// The family's configuration type.
    type Config;

    /// The value of the format's architecture key (GGUF `general.architecture`).
    fn arch(&self) -> &'static str;

    /// The role of the tensor called `name`, or `None` for a name the family does not know.
    fn role_of(&self, name: &str) -> Option<TensorRole>;

    /// The format's name of the tensor with `role`.
    fn name_of(&self, role: TensorRole) -> String;

    /// Reads the configuration: checks the architecture, reads every hyper-parameter through the
    /// typed readers of [`crate::config`], and validates it.
    fn read_config(&self, meta: &dyn MetadataSource) -> Result<Self::Config, ConfigError>;
}

/// Builds a per-layer role from its layer index.
pub(crate) type LayerRole = fn(usize) -> TensorRole;

/// The role of a llama.cpp per-layer tensor name `blk.N.<suffix>` from a family's suffix table.
/// Only canonical decimal layer numbers are accepted, so that the name round-trips.
pub(crate) fn gguf_layer_role(name: &str, table: &[(&str, LayerRole)]) -> Option<TensorRole> {
    layer_role(name, "blk.", table)
}

/// The role of a per-layer tensor name `<prefix>N.<suffix>` (`blk.` in GGUF, `model.layers.` in
/// transformers) from a family's suffix table; canonical decimal layer numbers only.
pub(crate) fn layer_role(
    name: &str,
    prefix: &str,
    table: &[(&str, LayerRole)],
) -> Option<TensorRole> {
    let (layer, tensor) = name.strip_prefix(prefix)?.split_once('.')?;
    if layer.is_empty() || (layer.len() > 1 && layer.starts_with('0')) {
        return None;
    }
    if !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    table
        .iter()
        .find(|(suffix, _)| *suffix == tensor)
        .map(|(_, role)| role(layer))
}

/// The llama.cpp name `blk.N.<suffix>` of a per-layer role; a role missing from the table gets
/// a descriptive non-GGUF name (it then never matches a file's tensor).
pub(crate) fn gguf_layer_name(role: TensorRole, table: &[(&str, LayerRole)]) -> String {
    layer_name(role, "blk.", table)
}

/// The name `<prefix>N.<suffix>` of a per-layer role (see [`gguf_layer_name`]).
pub(crate) fn layer_name(role: TensorRole, prefix: &str, table: &[(&str, LayerRole)]) -> String {
    let l = role.layer().unwrap_or(usize::MAX);
    match table.iter().find(|(_, f)| f(l) == role) {
        Some((suffix, _)) => format!("{prefix}{l}.{suffix}"),
        None => format!("{role:?}"),
    }
}

/// Every family the encrypter and the engine know, dispatched on the file's architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KnownFamily {
    /// GGUF `llama`.
    Llama(LlamaFamily),
    /// GGUF `gemma3`.
    Gemma3(Gemma3Family),
    /// GGUF `qwen2`.
    Qwen2(Qwen2Family),
}

/// Architectures [`KnownFamily::of`] accepts, for error messages.
pub const SUPPORTED_ARCHITECTURES: &str =
    "llama (SmolLM2, TinyLlama, Llama 2/3, Mistral), gemma3, qwen2";

impl KnownFamily {
    /// The family of a GGUF `general.architecture`, or
    /// [`ConfigError::UnsupportedArchitecture`].
    pub fn of(arch: &str) -> Result<Self, ConfigError> {
        match arch {
            "llama" => Ok(KnownFamily::Llama(LlamaFamily)),
            "gemma3" => Ok(KnownFamily::Gemma3(Gemma3Family)),
            "qwen2" => Ok(KnownFamily::Qwen2(Qwen2Family)),
            other => Err(ConfigError::UnsupportedArchitecture {
                arch: other.to_string(),
            }),
        }
    }

    /// Reads `general.architecture`, then the family's config.
    pub fn read(meta: &dyn MetadataSource) -> Result<(Self, ModelConfig), ConfigError> {
        let family = Self::of(&meta_str(meta, "general.architecture")?)?;
        let config = family.read_config(meta)?;
        Ok((family, config))
    }
}

impl ArchFamily for KnownFamily {
    type Config = ModelConfig;

    fn arch(&self) -> &'static str {
        match self {
            KnownFamily::Llama(f) => f.arch(),
            KnownFamily::Gemma3(f) => f.arch(),
            KnownFamily::Qwen2(f) => f.arch(),
        }
    }

    fn role_of(&self, name: &str) -> Option<TensorRole> {
        match self {
            KnownFamily::Llama(f) => f.role_of(name),
            KnownFamily::Gemma3(f) => f.role_of(name),
            KnownFamily::Qwen2(f) => f.role_of(name),
        }
    }

    fn name_of(&self, role: TensorRole) -> String {
        match self {
            KnownFamily::Llama(f) => f.name_of(role),
            KnownFamily::Gemma3(f) => f.name_of(role),
            KnownFamily::Qwen2(f) => f.name_of(role),
        }
    }

    fn read_config(&self, meta: &dyn MetadataSource) -> Result<ModelConfig, ConfigError> {
        Ok(match self {
            KnownFamily::Llama(f) => ModelConfig::Llama(f.read_config(meta)?),
            KnownFamily::Gemma3(f) => ModelConfig::Gemma3(f.read_config(meta)?),
            KnownFamily::Qwen2(f) => ModelConfig::Qwen2(f.read_config(meta)?),
        })
    }
}
