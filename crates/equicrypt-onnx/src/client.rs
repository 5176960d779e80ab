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

    /// Runs the model on `inputs` (in graph-input order) and returns its outputs. Integer
    /// inputs (shape arithmetic that crossed the split) are fixed as constants, so that tract
    /// can type the reshapes that read them.
    pub fn run(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, OnnxError> {
        let shapes: Vec<Vec<usize>> = inputs
            .iter()
            .map(|t| {
                let mut key = t.shape().to_vec();
                if !t.datum_type().is_float() {
                    if let Ok(v) = t.cast_to::<i64>() {
                        key.extend(
                            crate::values::<i64>(&v)
                                .unwrap_or_default()
                                .iter()
                                .map(|&x| x as usize),
                        );
                    }
                }
                key
            })
            .collect();
        let fail = |e: TractError| OnnxError::Run {
            what: self.what.clone(),
            reason: format!("{e:#}"),
        };
        let plan = match &self.cache {
            Some((s, plan)) if *s == shapes => plan.clone(),
            _ => {
                let mut m = self.inference.clone();
                for (i, t) in inputs.iter().enumerate() {
                    let fact = if t.datum_type().is_float() {
                        InferenceFact::dt_shape(t.datum_type(), t.shape())
                    } else {
                        InferenceFact::from(t.clone())
                    };
                    m = m.with_input_fact(i, fact).map_err(fail)?;
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
    head: Option<Stem>,
}

/// What the client keeps between sending the stem's values and receiving the server's answer.
pub struct Pending {
    /// The stem's values the head reads, in the manifest's `kept` order.
    pub kept: Vec<Tensor>,
    /// The raw inputs the head reads, in the manifest's `head_raw` order.
    pub raw: Vec<Tensor>,
    /// Graph outputs the stem computed, by name.
    pub local: HashMap<String, Tensor>,
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
        let head = match &manifest.head_model {
            Some(h) => Some(Stem::load(&dir.join(h))?),
            None => None,
        };
        Ok(Self {
            manifest,
            perms,
            stem,
            head,
        })
    }

    /// The server model's path in `dir`.
    pub fn server_model(dir: &Path) -> std::path::PathBuf {
        dir.join(SERVER_MODEL)
    }

    /// Runs the stem on raw inputs: returns the values to send (in the server's input order)
    /// and what the client keeps for the answer.
    pub fn encrypt_inputs(
        &mut self,
        inputs: Vec<Tensor>,
    ) -> Result<(Vec<Tensor>, Pending), OnnxError> {
        if inputs.len() != self.manifest.inputs.len() {
            return Err(OnnxError::Mismatch(format!(
                "the model takes {} inputs, {} given",
                self.manifest.inputs.len(),
                inputs.len()
            )));
        }
        let raw = self.head_raw(&inputs);
        let mut out = self.stem.run(inputs)?;
        let mut rest = out.split_off(self.manifest.cut.len().min(out.len()));
        let local_out = rest.split_off(self.manifest.kept.len().min(rest.len()));
        let names = self
            .manifest
            .outputs
            .iter()
            .filter(|o| !o.from_server && !o.from_head);
        let local = names.map(|o| o.name.clone()).zip(local_out).collect();
        Ok((
            out,
            Pending {
                kept: rest,
                raw,
                local,
            },
        ))
    }

    /// The raw inputs the head reads, picked from all the model's inputs.
    pub fn head_raw(&self, inputs: &[Tensor]) -> Vec<Tensor> {
        self.manifest
            .head_raw
            .iter()
            .filter_map(|n| self.manifest.inputs.iter().position(|x| x == n))
            .filter_map(|i| inputs.get(i).cloned())
            .collect()
    }

    /// Turns the server's answer into the model's outputs, by name: decrypts the server's
    /// permuted outputs and runs the head on the values it returned.
    pub fn finish(
        &mut self,
        pending: Pending,
        server: Vec<Tensor>,
    ) -> Result<HashMap<String, Tensor>, OnnxError> {
        let mut served = self.server_outputs();
        let expected = served.len();
        served.truncate(expected - self.manifest.returned.len());
        if server.len() != expected {
            return Err(OnnxError::Mismatch(format!(
                "the server returned {} values, its model has {expected} outputs",
                server.len()
            )));
        }
        let mut server = server;
        let returned = server.split_off(served.len());
        let mut outputs = pending.local;
        for (name, t) in served.iter().zip(server) {
            let t = self.decrypt_output(name, t)?;
            outputs.insert(name.clone(), t);
        }
        if let Some(head) = &mut self.head {
            let mut inputs = returned;
            inputs.extend(pending.kept);
            inputs.extend(pending.raw);
            let out = head.run(inputs)?;
            let names = self.manifest.outputs.iter().filter(|o| o.from_head);
            for (o, t) in names.zip(out) {
                outputs.insert(o.name.clone(), t);
            }
        }
        Ok(outputs)
    }

    /// The names of the server model's outputs, in order.
    pub fn server_outputs(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .manifest
            .outputs
            .iter()
            .filter(|o| o.from_server)
            .map(|o| o.name.clone())
            .collect();
        v.extend(self.manifest.returned.iter().cloned());
        v
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
