//! `encrypt` for ONNX models: plan, draw, rewrite, split, write `client.onnx`, `server.onnx`
//! and the client's manifest. Nothing is written unless every step succeeded.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use serde::{Deserialize, Serialize};
use tract_onnx::pb;

use equicrypt_core::SecretKey;

use crate::graph::OnnxGraph;
use crate::plan::{plan, Ann};
use crate::split::{split, sub_model};
use crate::tensor::permute_axis;
use crate::vars::{expand, Vars};
use crate::OnnxError;

/// The manifest's file name in an encrypted directory.
pub const MANIFEST: &str = "client.json";
/// The client's model (the stem) in an encrypted directory.
pub const CLIENT_MODEL: &str = "client.onnx";
/// The client's model after the server (the head), where the model needs one.
pub const HEAD_MODEL: &str = "head.onnx";
/// The server's model in an encrypted directory.
pub const SERVER_MODEL: &str = "server.onnx";
/// The manifest's format tag.
pub const FORMAT: &str = "equicrypt-onnx/1";

/// What the client needs besides the key: which values cross, and how the outputs are permuted.
/// It holds no secret: the permutations are drawn from the key under `model_id`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// BLAKE3 of the plaintext model file (first 32 hex digits): the key-derivation label.
    pub model_id: String,
    /// Fingerprint of the key that encrypted it.
    pub key_fingerprint: String,
    /// The model's runtime inputs (fed to the client's stem).
    pub inputs: Vec<String>,
    /// The stem's outputs that the client sends: the server model's inputs, in order.
    pub cut: Vec<String>,
    /// The graph outputs and how each is permuted.
    pub outputs: Vec<OutputSpec>,
    /// The client's head model ([`HEAD_MODEL`]), if the model has a head.
    #[serde(default)]
    pub head_model: Option<String>,
    /// Permuted values the server returns for the head, after its graph outputs.
    #[serde(default)]
    pub returned: Vec<String>,
    /// Stem values the client keeps for the head, after `cut` among the stem's outputs.
    #[serde(default)]
    pub kept: Vec<String>,
    /// Raw inputs the head reads.
    #[serde(default)]
    pub head_raw: Vec<String>,
    /// The permutation variables.
    pub vars: Vars,
}

impl Manifest {
    /// The key-derivation label of this model's permutations.
    pub fn label(&self) -> String {
        label(&self.model_id)
    }
}

fn label(model_id: &str) -> String {
    format!("equicrypt/onnx/v1/{model_id}")
}

/// One graph output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutputSpec {
    /// Its name.
    pub name: String,
    /// Whether the server computes it (else the client's stem or head does).
    pub from_server: bool,
    /// Whether the client's head computes it (from values the server returns).
    #[serde(default)]
    pub from_head: bool,
    /// Per axis, its permutation.
    pub axes: Ann,
}

/// What `encrypt` did.
#[derive(Clone, Debug, Serialize)]
pub struct OnnxReport {
    /// Nodes in the model.
    pub nodes: usize,
    /// Nodes the client runs (the stem, with the constants it reads).
    pub client_nodes: usize,
    /// Nodes the server runs.
    pub server_nodes: usize,
    /// Nodes the client runs after the server (the head).
    pub head_nodes: usize,
    /// Multiply–accumulates per input in the head.
    pub head_macs: u64,
    /// Values the server returns to the head, and their shapes.
    pub returned: Vec<(String, String)>,
    /// Independent secret permutations (joined classes).
    pub permutations: usize,
    /// Their sizes, largest first.
    pub permutation_sizes: Vec<usize>,
    /// Tensors rewritten.
    pub rewritten_tensors: usize,
    /// Multiply–accumulates per input in the client's stem (Conv, Gemm, MatMul).
    pub client_macs: u64,
    /// Multiply–accumulates per input in the whole model.
    pub total_macs: u64,
    /// The values sent to the server and their shapes.
    pub cut: Vec<(String, String)>,
    /// The outputs and their permuted axes.
    pub outputs: Vec<(String, Vec<usize>)>,
    /// The directory written.
    pub out_dir: PathBuf,
}

/// Encrypts `input` (an ONNX file) with `key` into `out_dir`: [`CLIENT_MODEL`],
/// [`SERVER_MODEL`] and [`MANIFEST`].
pub fn encrypt_onnx(
    key: &SecretKey,
    input: &Path,
    out_dir: &Path,
) -> Result<OnnxReport, OnnxError> {
    let (graph, model_id) = read_model(input)?;
    let plan = plan(&graph)?;
    let split = split(&graph, &plan)?;
    let model = rewrite(key, &graph, &plan, &model_id)?;

    let inputs: Vec<String> = graph
        .runtime_inputs()
        .iter()
        .map(|i| i.name.clone())
        .collect();
    let mut client_out = split.cut.clone();
    client_out.extend(split.kept.iter().cloned());
    client_out.extend(split.client_outputs.iter().cloned());
    let client = sub_model(&graph, &model, &split.client, &inputs, &client_out)?;
    let mut server_out = split.server_outputs.clone();
    server_out.extend(split.returned.iter().cloned());
    let server = sub_model(&graph, &model, &split.server, &split.cut, &server_out)?;
    let head = if split.head.is_empty() {
        None
    } else {
        let mut head_in = split.returned.clone();
        head_in.extend(split.kept.iter().cloned());
        head_in.extend(split.head_raw.iter().cloned());
        Some(sub_model(
            &graph,
            &model,
            &split.head,
            &head_in,
            &split.head_outputs,
        )?)
    };
    let manifest = Manifest {
        format: FORMAT.into(),
        model_id,
        key_fingerprint: key.fingerprint().to_string(),
        inputs,
        cut: split.cut.clone(),
        outputs: graph
            .graph()
            .output
            .iter()
            .map(|o| OutputSpec {
                name: o.name.clone(),
                from_server: split.server_outputs.contains(&o.name),
                from_head: split.head_outputs.contains(&o.name),
                axes: plan.annotation(&o.name),
            })
            .collect(),
        head_model: head.as_ref().map(|_| HEAD_MODEL.to_string()),
        returned: split.returned.clone(),
        kept: split.kept.clone(),
        head_raw: split.head_raw.clone(),
        vars: plan.vars.clone(),
    };

    let mut sizes: Vec<usize> = (0..plan.vars.len())
        .filter(|&v| plan.vars.find(v) == v)
        .map(|v| plan.vars.size(v))
        .collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let client_set: std::collections::HashSet<usize> = split.client.iter().copied().collect();
    let head_set: std::collections::HashSet<usize> = split.head.iter().copied().collect();
    let (mut client_macs, mut head_macs, mut total_macs) = (0, 0, 0);
    for (i, node) in graph.nodes().iter().enumerate() {
        let m = macs(&graph, node);
        total_macs += m;
        if client_set.contains(&i) {
            client_macs += m;
        }
        if head_set.contains(&i) {
            head_macs += m;
        }
    }
    let report = OnnxReport {
        nodes: graph.nodes().len(),
        client_nodes: split.client.len(),
        server_nodes: split.server.len(),
        head_nodes: split.head.len(),
        head_macs,
        returned: split
            .returned
            .iter()
            .map(|c| (c.clone(), shape_text(&graph, c)))
            .collect(),
        permutations: sizes.len(),
        permutation_sizes: sizes,
        rewritten_tensors: plan.rewrites.len(),
        client_macs,
        total_macs,
        cut: split
            .cut
            .iter()
            .map(|c| (c.clone(), shape_text(&graph, c)))
            .collect(),
        outputs: manifest
            .outputs
            .iter()
            .map(|o| {
                let axes = o
                    .axes
                    .iter()
                    .enumerate()
                    .filter(|a| a.1.is_some())
                    .map(|a| a.0)
                    .collect();
                (o.name.clone(), axes)
            })
            .collect(),
        out_dir: out_dir.to_path_buf(),
    };

    let manifest_json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    std::fs::create_dir_all(out_dir).map_err(|source| OnnxError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    write_atomic(out_dir, SERVER_MODEL, &server.encode_to_vec())?;
    write_atomic(out_dir, CLIENT_MODEL, &client.encode_to_vec())?;
    let head_path = out_dir.join(HEAD_MODEL);
    match &head {
        Some(h) => write_atomic(out_dir, HEAD_MODEL, &h.encode_to_vec())?,
        None if head_path.exists() => {
            std::fs::remove_file(&head_path).map_err(|source| OnnxError::Io {
                path: head_path.clone(),
                source,
            })?
        }
        None => {}
    }
    write_atomic(out_dir, MANIFEST, &manifest_json)?;
    Ok(report)
}

/// The whole model with every planned tensor permuted (not split: its input is the raw input).
fn rewrite(
    key: &SecretKey,
    graph: &OnnxGraph,
    plan: &crate::plan::ChannelPlan,
    model_id: &str,
) -> Result<pb::ModelProto, OnnxError> {
    let perms = plan.vars.draw(key, &label(model_id));
    let mut model = graph.proto.clone();
    let g = model.graph.as_mut().expect("checked on reading");
    for (name, axes) in &plan.rewrites {
        let tensor = match g.initializer.iter_mut().find(|t| &t.name == name) {
            Some(t) => t,
            None => constant_value(&mut g.node, name).ok_or_else(|| OnnxError::Tensor {
                tensor: name.clone(),
                reason: "not an initializer nor a `Constant` node's `value`".into(),
            })?,
        };
        for (&axis, ap) in axes {
            let full = expand(&perms[ap.var], ap.outer, ap.inner);
            permute_axis(tensor, axis, &full)?;
        }
    }
    Ok(model)
}

/// The whole encrypted model, unsplit, as ONNX bytes: for benchmarks that compare the cost of
/// permuted weights alone with the plaintext model (a deployment must use the split instead,
/// or the server reads raw inputs).
pub fn encrypt_onnx_whole(key: &SecretKey, input: &Path) -> Result<Vec<u8>, OnnxError> {
    let (graph, model_id) = read_model(input)?;
    let plan = plan(&graph)?;
    Ok(rewrite(key, &graph, &plan, &model_id)?.encode_to_vec())
}

/// Reads and analyses a model; its id is the BLAKE3 of the file (first 32 hex digits).
fn read_model(input: &Path) -> Result<(OnnxGraph, String), OnnxError> {
    let bytes = std::fs::read(input).map_err(|source| OnnxError::Io {
        path: input.to_path_buf(),
        source,
    })?;
    let model_id = blake3::hash(&bytes).to_hex()[..32].to_string();
    let graph = OnnxGraph::from_bytes(&bytes).map_err(|e| e.at(input))?;
    Ok((graph, model_id))
}

fn constant_value<'a>(
    nodes: &'a mut [pb::NodeProto],
    name: &str,
) -> Option<&'a mut pb::TensorProto> {
    let node = nodes
        .iter_mut()
        .find(|n| n.op_type == "Constant" && n.output.first().is_some_and(|o| o == name))?;
    node.attribute
        .iter_mut()
        .find(|a| a.name == "value")
        .and_then(|a| a.t.as_mut())
}

fn shape_text(graph: &OnnxGraph, name: &str) -> String {
    match graph.facts(name).dims {
        None => "?".into(),
        Some(d) => {
            let parts: Vec<String> = d
                .iter()
                .map(|d| match d {
                    Some(crate::graph::Dim::Known(n)) => n.to_string(),
                    Some(crate::graph::Dim::Symbolic(s)) => s.clone(),
                    None => "?".into(),
                })
                .collect();
            format!("[{}]", parts.join(", "))
        }
    }
}

/// Multiply–accumulates of a linear node per input (symbolic dims count as 1).
fn macs(graph: &OnnxGraph, node: &pb::NodeProto) -> u64 {
    let count = |name: &str| -> u64 {
        graph.facts(name).dims.map_or(0, |d| {
            d.iter()
                .map(|d| d.as_ref().and_then(|d| d.known()).unwrap_or(1) as u64)
                .product()
        })
    };
    let out = node.output.first().map_or(0, |o| count(o));
    match node.op_type.as_str() {
        "Conv" => {
            // out × (C_in / group × kernel): the weight's size divided by its output channels.
            let w = node.input.get(1).map_or(0, |w| count(w));
            let m = node
                .input
                .get(1)
                .and_then(|w| graph.facts(w).dim(0))
                .unwrap_or(1) as u64;
            out * (w / m.max(1))
        }
        "Gemm" | "MatMul" => {
            let x = node.input.first().map(String::as_str).unwrap_or_default();
            let k = graph
                .facts(x)
                .dims
                .and_then(|d| d.last().cloned().flatten())
                .and_then(|d| d.known())
                .unwrap_or(1) as u64;
            out * k
        }
        _ => 0,
    }
}

/// Writes `dir/name` through a temporary file in `dir`, renamed into place.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), OnnxError> {
    let path = dir.join(name);
    let io = |source| OnnxError::Io {
        path: path.clone(),
        source,
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(&path).map_err(|e| io(e.error))?;
    Ok(())
}
