//! The client/server split: the client keeps the *stem* — every node from the raw inputs up to
//! and including the first nonlinear activation of a permuted value — and sends the server only
//! permuted values. Where a graph output would come out unpermuted (a single-channel image, a
//! denoised sample), the client also keeps the *head*: the nodes from the server's last permuted
//! values to that output. Both crossings are checked: a floating-point value that goes to or
//! comes from the server must be permuted, so raw inputs, plaintext activations and plaintext
//! outputs never cross.

use std::collections::HashSet;

use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::graph::{node_label, Dim, OnnxGraph};
use crate::plan::ChannelPlan;
use crate::OnnxError;

/// Nonlinear elementwise ops (activations, and the pieces of a decomposed GELU, LayerNorm or
/// softmax): the stem ends after the first one applied to a permuted value.
const ACTIVATIONS: &[&str] = &[
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Gelu",
    "Mish",
    "Clip",
    "Erf",
    "Pow",
    "Sqrt",
    "Exp",
    "Log",
    "Reciprocal",
    "Softmax",
];

/// Which side runs each node.
#[derive(Clone, Debug)]
pub struct Split {
    /// Nodes (indices) the client runs, in graph order.
    pub client: Vec<usize>,
    /// Nodes the server runs, in graph order.
    pub server: Vec<usize>,
    /// Values the client computes and sends: the server's inputs.
    pub cut: Vec<String>,
    /// Graph outputs the client's stem computes itself.
    pub client_outputs: Vec<String>,
    /// Graph outputs the server returns (permuted).
    pub server_outputs: Vec<String>,
    /// Nodes the client runs after the server (the head), in graph order.
    pub head: Vec<usize>,
    /// Permuted values the server returns for the head (after `server_outputs`).
    pub returned: Vec<String>,
    /// Stem values the client keeps for the head (after `cut` among the stem's outputs).
    pub kept: Vec<String>,
    /// Raw inputs the head reads.
    pub head_raw: Vec<String>,
    /// Graph outputs the head computes.
    pub head_outputs: Vec<String>,
}

/// Splits the graph after its stem.
pub fn split(graph: &OnnxGraph, plan: &ChannelPlan) -> Result<Split, OnnxError> {
    let nodes = graph.nodes();
    let mut client_vals: HashSet<String> = graph
        .runtime_inputs()
        .iter()
        .map(|i| i.name.clone())
        .collect();
    let mut stopped: HashSet<String> = HashSet::new();
    let mut client = Vec::new();
    let mut server = Vec::new();
    let mut konst_nodes = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let ins: Vec<&String> = node.input.iter().filter(|x| !x.is_empty()).collect();
        if ins.iter().all(|x| plan.konst.contains(*x)) {
            konst_nodes.push(i);
            continue;
        }
        let data: Vec<&&String> = ins.iter().filter(|x| !plan.konst.contains(**x)).collect();
        let on_client = data
            .iter()
            .all(|x| client_vals.contains(**x) && !stopped.contains(**x));
        if on_client {
            client.push(i);
            let ends_stem = ACTIVATIONS.contains(&node.op_type.as_str())
                && data.iter().any(|x| plan.is_permuted(x));
            for o in node.output.iter().filter(|o| !o.is_empty()) {
                client_vals.insert(o.clone());
                if ends_stem {
                    stopped.insert(o.clone());
                }
            }
        } else {
            server.push(i);
        }
    }
    let is_float = |v: &str| graph.facts(v).datum_type.is_none_or(|t| t.is_float());
    let raw_inputs: HashSet<String> = graph
        .runtime_inputs()
        .iter()
        .map(|i| i.name.clone())
        .collect();
    // The head: back from each unpermuted graph output the server would compute, through
    // unpermuted values, up to permuted ones.
    let mut server_set: HashSet<usize> = server.iter().copied().collect();
    let mut head_set: HashSet<usize> = HashSet::new();
    let mut work: Vec<usize> = graph
        .graph()
        .output
        .iter()
        .filter(|o| is_float(&o.name) && !plan.is_permuted(&o.name))
        .filter_map(|o| graph.producer(&o.name))
        .filter(|p| server_set.contains(p))
        .collect();
    while let Some(n) = work.pop() {
        if !server_set.contains(&n) || !head_set.insert(n) {
            continue;
        }
        for v in nodes[n]
            .input
            .iter()
            .filter(|x| !x.is_empty() && !plan.konst.contains(*x))
        {
            if let Some(p) = graph.producer(v) {
                if server_set.contains(&p)
                    && !head_set.contains(&p)
                    && is_float(v)
                    && !plan.is_permuted(v)
                {
                    work.push(p);
                }
            }
        }
    }
    server.retain(|n| !head_set.contains(n));
    server_set.retain(|n| !head_set.contains(n));
    let head: Vec<usize> = {
        let mut h: Vec<usize> = head_set.iter().copied().collect();
        h.sort_unstable();
        h
    };
    // Shape arithmetic on the head's values (sizes for a final Resize) runs in the head too.
    let mut head = head;
    let mut head_vals: HashSet<String> = head
        .iter()
        .flat_map(|&i| nodes[i].output.iter().cloned())
        .collect();
    loop {
        let moved: Vec<usize> = server
            .iter()
            .copied()
            .filter(|&i| {
                let n = &nodes[i];
                n.input.iter().any(|x| head_vals.contains(x))
                    && n.output
                        .iter()
                        .filter(|o| !o.is_empty())
                        .all(|o| graph.facts(o).datum_type.is_some_and(|t| !t.is_float()))
            })
            .collect();
        if moved.is_empty() {
            break;
        }
        for i in moved {
            server.retain(|&n| n != i);
            server_set.remove(&i);
            head_set.insert(i);
            head.push(i);
            head_vals.extend(nodes[i].output.iter().cloned());
        }
    }
    head.sort_unstable();
    for &i in &server {
        if let Some(v) = nodes[i]
            .input
            .iter()
            .find(|x| head_vals.contains(x.as_str()))
        {
            return Err(OnnxError::Leak {
                value: v.clone(),
                node: node_label(&nodes[i]),
            });
        }
    }
    let mut cut = Vec::new();
    let mut seen = HashSet::new();
    for &i in &server {
        for x in nodes[i].input.iter().filter(|x| !x.is_empty()) {
            if client_vals.contains(x) && seen.insert(x.clone()) {
                if is_float(x) && !plan.is_permuted(x) {
                    return Err(OnnxError::Leak {
                        value: x.clone(),
                        node: node_label(&nodes[i]),
                    });
                }
                cut.push(x.clone());
            }
        }
    }
    let (mut returned, mut kept, mut head_raw) = (Vec::new(), Vec::new(), Vec::new());
    let mut seen = HashSet::new();
    for &i in &head {
        for x in nodes[i]
            .input
            .iter()
            .filter(|x| !x.is_empty() && !plan.konst.contains(*x))
        {
            if head_vals.contains(x) || !seen.insert(x.clone()) {
                continue;
            }
            match graph.producer(x) {
                Some(p) if server_set.contains(&p) => {
                    if is_float(x) && !plan.is_permuted(x) {
                        return Err(OnnxError::Leak {
                            value: x.clone(),
                            node: node_label(&nodes[i]),
                        });
                    }
                    returned.push(x.clone());
                }
                _ if raw_inputs.contains(x) => head_raw.push(x.clone()),
                _ => kept.push(x.clone()),
            }
        }
    }
    let mut client_outputs = Vec::new();
    let mut server_outputs = Vec::new();
    let mut head_outputs = Vec::new();
    for o in &graph.graph().output {
        let producer = graph.producer(&o.name);
        if producer.is_some_and(|p| head_set.contains(&p)) {
            head_outputs.push(o.name.clone());
        } else if producer.is_some_and(|p| server_set.contains(&p)) {
            if is_float(&o.name) && !plan.is_permuted(&o.name) {
                return Err(OnnxError::PlainOutput {
                    output: o.name.clone(),
                });
            }
            server_outputs.push(o.name.clone());
        } else {
            client_outputs.push(o.name.clone());
        }
    }
    // Constant-only nodes go to each side that reads them (possibly both).
    let with_consts = |side: &mut Vec<usize>| {
        let mut needed: HashSet<String> = side
            .iter()
            .flat_map(|&i| nodes[i].input.iter().cloned())
            .collect();
        let mut extra = Vec::new();
        for &k in konst_nodes.iter().rev() {
            if nodes[k].output.iter().any(|o| needed.contains(o)) {
                extra.push(k);
                needed.extend(nodes[k].input.iter().cloned());
            }
        }
        side.extend(extra);
        side.sort_unstable();
    };
    with_consts(&mut client);
    with_consts(&mut server);
    if !head.is_empty() {
        with_consts(&mut head);
    }
    Ok(Split {
        client,
        server,
        cut,
        client_outputs,
        server_outputs,
        head,
        returned,
        kept,
        head_raw,
        head_outputs,
    })
}

/// The ONNX element type of a tract datum type, for the values the split turns into graph
/// inputs and outputs.
fn elem_type(t: DatumType) -> Option<pb::tensor_proto::DataType> {
    use pb::tensor_proto::DataType as D;
    Some(match t {
        DatumType::F32 => D::Float,
        DatumType::F16 => D::Float16,
        DatumType::F64 => D::Double,
        DatumType::I64 | DatumType::TDim => D::Int64,
        DatumType::I32 => D::Int32,
        DatumType::I8 => D::Int8,
        DatumType::U8 => D::Uint8,
        DatumType::Bool => D::Bool,
        _ => return None,
    })
}

/// A `ValueInfoProto` for a value, from tract's facts (symbolic dims become `dim_param`s).
fn value_info(graph: &OnnxGraph, name: &str) -> Result<pb::ValueInfoProto, OnnxError> {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let facts = graph.facts(name);
    let unknown = || OnnxError::Shapes {
        reason: format!(
            "the type and shape of `{name}`, which the split sends to the server, are not known"
        ),
    };
    let t = facts.datum_type.and_then(elem_type).ok_or_else(unknown)?;
    let dims = facts.dims.ok_or_else(unknown)?;
    let dim = dims
        .iter()
        .enumerate()
        .map(|(k, d)| Dimension {
            denotation: String::new(),
            value: Some(match d {
                Some(Dim::Known(n)) => Value::DimValue(*n as i64),
                Some(Dim::Symbolic(s)) => Value::DimParam(s.clone()),
                None => Value::DimParam(format!("{name}_dim_{k}")),
            }),
        })
        .collect();
    Ok(pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: t as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    })
}

/// The model holding only `nodes` of `model` (already rewritten), with `inputs` and `outputs` as
/// its graph inputs and outputs and only the initializers those nodes read.
pub fn sub_model(
    graph: &OnnxGraph,
    model: &pb::ModelProto,
    nodes: &[usize],
    inputs: &[String],
    outputs: &[String],
) -> Result<pb::ModelProto, OnnxError> {
    let g = model.graph.as_ref().expect("checked on reading");
    let used: HashSet<&String> = nodes.iter().flat_map(|&i| g.node[i].input.iter()).collect();
    let original_inputs: Vec<&pb::ValueInfoProto> = g.input.iter().collect();
    let mut graph_inputs = Vec::new();
    for name in inputs {
        match original_inputs.iter().find(|i| &i.name == name) {
            Some(i) => graph_inputs.push((*i).clone()),
            None => graph_inputs.push(value_info(graph, name)?),
        }
    }
    let mut graph_outputs = Vec::new();
    for name in outputs {
        match g.output.iter().find(|o| &o.name == name) {
            Some(o) => graph_outputs.push(o.clone()),
            None => graph_outputs.push(value_info(graph, name)?),
        }
    }
    let sub = pb::GraphProto {
        node: nodes.iter().map(|&i| g.node[i].clone()).collect(),
        name: g.name.clone(),
        initializer: g
            .initializer
            .iter()
            .filter(|t| used.contains(&t.name))
            .cloned()
            .collect(),
        sparse_initializer: vec![],
        doc_string: g.doc_string.clone(),
        input: graph_inputs,
        output: graph_outputs,
        value_info: vec![],
        quantization_annotation: vec![],
    };
    Ok(pb::ModelProto {
        graph: Some(sub),
        ..model.clone()
    })
}
