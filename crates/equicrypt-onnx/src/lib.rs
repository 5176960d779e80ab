//! Equivariant Encryption of ONNX graphs (CNNs, vision models): secret channel permutations
//! propagated through the graph ([`plan`]), folded into its constant tensors ([`tensor`]), and a
//! split ([`split`]) that leaves the stem — raw pixels to the first permuted activation — on
//! the client. The rules and what they hide are in `docs/onnx.md`.
//!
//! The graph is never rebuilt: the encrypted files hold the same nodes with the same attributes
//! and shapes, so stock runtimes (ONNX Runtime, tract) run them unchanged. Outputs agree with
//! the plaintext model to float rounding (sums over permuted channels run in another order).

pub mod client;
pub mod encrypt;
pub mod eval;
pub mod graph;
pub mod npy;
pub mod ort;
pub mod plan;
pub mod split;
pub mod tensor;
pub mod vars;

use std::path::PathBuf;

pub use client::{OnnxClient, Stem};
pub use encrypt::{encrypt_onnx, Manifest, OnnxReport, OutputSpec};
pub use graph::OnnxGraph;
pub use plan::ChannelPlan;
pub use vars::{AxisPerm, Vars};

/// Errors of the ONNX pass, the split and the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnnxError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid ONNX model.
    #[error("{}not a valid ONNX model: {reason}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Corrupt {
        /// The file, where known.
        path: Option<PathBuf>,
        /// What the decoder said.
        reason: String,
    },
    /// tract's shape inference failed, or a shape the pass needs is unknown.
    #[error("shape inference: {reason}")]
    Shapes {
        /// The reason.
        reason: String,
    },
    /// A tensor is stored outside the file (models over 2 GB); not supported yet.
    #[error("tensor `{tensor}` is stored in an external file, which is not supported")]
    ExternalData {
        /// The tensor.
        tensor: String,
    },
    /// The pass cannot prove that the node commutes with the permutation it meets.
    #[error("node `{node}` ({op}): {reason}")]
    Unsupported {
        /// The node's name.
        node: String,
        /// Its operator.
        op: String,
        /// What is not supported.
        reason: String,
    },
    /// A constant would have to be permuted for one reader and stay as it is for another.
    #[error("constant `{tensor}` is also read by node `{node}`, which needs it unpermuted")]
    SharedConstant {
        /// The constant.
        tensor: String,
        /// The node that reads it unpermuted.
        node: String,
    },
    /// The server would read a value in plaintext.
    #[error(
        "the server's node `{node}` would read `{value}` unpermuted: the split cannot hide it"
    )]
    Leak {
        /// The value.
        value: String,
        /// The server node that reads it.
        node: String,
    },
    /// A graph output would be computed in plaintext by the server.
    #[error("output `{output}` would be computed unpermuted on the server (a client-side head is not supported yet)")]
    PlainOutput {
        /// The output.
        output: String,
    },
    /// A tensor's data could not be permuted.
    #[error("tensor `{tensor}`: {reason}")]
    Tensor {
        /// The tensor.
        tensor: String,
        /// Why.
        reason: String,
    },
    /// The encrypted directory's manifest is missing, corrupt or for another key.
    #[error("{}: {reason}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An `.npy` file could not be read or written.
    #[error("{}: {reason}", path.display())]
    Npy {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// tract failed to run a model.
    #[error("running {what}: {reason}")]
    Run {
        /// Which model.
        what: String,
        /// tract's error.
        reason: String,
    },
    /// An input or output does not fit the model.
    #[error("{0}")]
    Mismatch(String),
    /// A key error.
    #[error(transparent)]
    Core(#[from] equicrypt_core::CoreError),
}

/// The elements of a tensor, in row-major order.
pub fn values<T: tract_onnx::prelude::Datum + Copy>(
    t: &tract_onnx::prelude::Tensor,
) -> Result<Vec<T>, OnnxError> {
    let view = t
        .to_plain_array_view::<T>()
        .map_err(|e| OnnxError::Mismatch(e.to_string()))?;
    Ok(view.iter().copied().collect())
}

impl OnnxError {
    /// Attaches the file to a corrupt-model error.
    pub(crate) fn at(self, p: &std::path::Path) -> Self {
        match self {
            OnnxError::Corrupt { path: None, reason } => OnnxError::Corrupt {
                path: Some(p.to_path_buf()),
                reason,
            },
            e => e,
        }
    }
}
