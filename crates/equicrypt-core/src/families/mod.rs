//! Model families: how a format names a family's tensors, and how its configuration is read.
//!
//! A transform plan speaks of tensors by [`TensorRole`] ("the query projection of layer 3"),
//! never by a file's tensor name. Each family is one file in this module implementing
//! [`ArchFamily`]: the map from its tensor names to roles and back, and the reader of its config
//! type from a [`MetadataSource`]. `docs/new-family.md` is the recipe for adding one.

mod llama;

pub use llama::LlamaFamily;

use crate::config::{ConfigError, MetadataSource};

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
            AttnNorm(l) | FfnNorm(l) | AttnQ(l) | AttnK(l) | AttnV(l) | AttnOutput(l)
            | AttnQBias(l) | AttnKBias(l) | AttnVBias(l) | AttnQNorm(l) | AttnKNorm(l)
            | FfnGate(l) | FfnUp(l) | FfnDown(l) => Some(l),
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
