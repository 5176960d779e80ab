//! The client of an encrypted ONNX model: runs the stem on raw inputs (in tract, in-process),
//! hands the permuted cut values to whatever runs the server model, and undoes the output
//! permutations.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;

use equicrypt_core::{Permutation, SecretKey};

use crate::encrypt::{Manifest, CLIENT_MODEL, FORMAT, MANIFEST, SERVER_MODEL};
use crate::tensor::permute_axis;
use crate::vars::expand;
use crate::OnnxError;

/// An ONNX model run by tract, re-optimized for each new input shape.
pub struct Stem {
    inference: InferenceModel,
    what: String,
    cache: Option<(Vec<Vec<usize>>, Arc<TypedRunnableModel>)>,
}

impl Stem {
    /// Loads an ONNX file for tract.
    pub fn load(path: &Path) -> Result<Self, OnnxError> {
        let what = path.display().to_string();
        let inference = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(|e| OnnxError::Run {
                what: what.clone(),
                reason: format!("{e:#}"),
            })?;
        Ok(Self {
            inference,
            what,
            cache: None,
        })
    }

    /// Runs the model on `inputs` (in graph-input order) and returns its outputs.
    pub fn run(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, OnnxError> {
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        let fail = |e: TractError| OnnxError::Run {
            what: self.what.clone(),
            reason: format!("{e:#}"),
        };
        let plan = match &self.cache {
            Some((s, plan)) if *s == shapes => plan.clone(),
            _ => {
                let mut m = self.inference.clone();
                for (i, t) in inputs.iter().enumerate() {
                    m = m
                        .with_input_fact(i, InferenceFact::dt_shape(t.datum_type(), t.shape()))
                        .map_err(fail)?;
                }
                let plan = m
                    .into_optimized()
                    .and_then(|m| m.into_runnable())
                    .map_err(fail)?;
                self.cache = Some((shapes, plan.clone()));
                plan
            }
        };
        let out = plan
            .run(inputs.into_iter().map(TValue::from).collect())
            .map_err(fail)?;
        Ok(out.into_iter().map(TValue::into_tensor).collect())
    }
}

/// The client side of an encrypted directory.
pub struct OnnxClient {
    /// The manifest.
    pub manifest: Manifest,
    perms: Vec<Permutation>,
    stem: Stem,
}

impl OnnxClient {
    /// Opens an encrypted directory with the key that encrypted it.
    pub fn open(dir: &Path, key: &SecretKey) -> Result<Self, OnnxError> {
        let path = dir.join(MANIFEST);
        let bad = |reason: String| OnnxError::Manifest {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|e| bad(format!("not a manifest: {e}")))?;
        if manifest.format != FORMAT {
            return Err(bad(format!(
                "format `{}`, expected `{FORMAT}`",
                manifest.format
            )));
        }
        let fp = key.fingerprint().to_string();
        if manifest.key_fingerprint != fp {
            return Err(bad(format!(
                "encrypted with key {}, not with this key ({fp})",
                manifest.key_fingerprint
            )));
        }
        let perms = manifest.vars.draw(key, &manifest.label());
        let stem = Stem::load(&dir.join(CLIENT_MODEL))?;
        Ok(Self {
            manifest,
            perms,
            stem,
        })
    }

    /// The server model's path in `dir`.
    pub fn server_model(dir: &Path) -> std::path::PathBuf {
        dir.join(SERVER_MODEL)
    }

    /// Runs the stem on raw inputs: returns the values to send (in the server's input order)
    /// and the outputs the client computed itself, by name.
    pub fn encrypt_inputs(
        &mut self,
        inputs: Vec<Tensor>,
    ) -> Result<(Vec<Tensor>, HashMap<String, Tensor>), OnnxError> {
        if inputs.len() != self.manifest.inputs.len() {
            return Err(OnnxError::Mismatch(format!(
                "the model takes {} inputs, {} given",
                self.manifest.inputs.len(),
                inputs.len()
            )));
        }
        let mut out = self.stem.run(inputs)?;
        let local = out.split_off(self.manifest.cut.len());
        let names = self.manifest.outputs.iter().filter(|o| !o.from_server);
        let local = names.map(|o| o.name.clone()).zip(local).collect();
        Ok((out, local))
    }

    /// Undoes the permutations of graph output `name`.
    pub fn decrypt_output(&self, name: &str, t: Tensor) -> Result<Tensor, OnnxError> {
        let spec = self
            .manifest
            .outputs
            .iter()
            .find(|o| o.name == name)
            .ok_or_else(|| OnnxError::Mismatch(format!("the model has no output `{name}`")))?;
        if spec.axes.iter().all(Option::is_none) {
            return Ok(t);
        }
        let t = t
            .cast_to::<f32>()
            .map_err(|e| OnnxError::Mismatch(format!("output `{name}`: {e}")))?
            .into_owned();
        if t.rank() != spec.axes.len() {
            return Err(OnnxError::Mismatch(format!(
                "output `{name}` has rank {}, the model's has {}",
                t.rank(),
                spec.axes.len()
            )));
        }
        let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
        let mut proto = tract_onnx::pb::TensorProto {
            name: name.to_string(),
            dims: shape.clone(),
            data_type: tract_onnx::pb::tensor_proto::DataType::Float as i32,
            float_data: crate::values::<f32>(&t)?,
            ..Default::default()
        };
        for (axis, ap) in spec.axes.iter().enumerate() {
            let Some(ap) = ap else { continue };
            let full = expand(&self.perms[ap.var], ap.outer, ap.inner).inverse();
            permute_axis(&mut proto, axis, &full)?;
        }
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        Tensor::from_shape(&dims, &proto.float_data).map_err(|e| OnnxError::Mismatch(e.to_string()))
    }

    /// The permutation drawn for variable `v` (for tests and the attack lab).
    pub fn permutation(&self, v: usize) -> &Permutation {
        &self.perms[v]
    }
}
