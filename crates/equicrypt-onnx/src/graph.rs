//! An ONNX model as read from disk: its protobuf (tract's prost types) and, for every value
//! name, the rank, dims and constant value that tract's shape inference found.
//!
//! The graph itself is never rebuilt: encryption only rewrites tensor data and splits the node
//! list, so every node, attribute and shape stays as the exporter wrote it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use prost::Message;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::OnnxError;

/// One dimension of a value, as tract inferred it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size.
    Known(usize),
    /// A symbolic size (a batch dimension), with tract's expression for it.
    Symbolic(String),
}

impl Dim {
    /// The size, where it is fixed.
    pub fn known(&self) -> Option<usize> {
        match self {
            Dim::Known(n) => Some(*n),
            Dim::Symbolic(_) => None,
        }
    }
}

/// What tract's analysis says about one value.
#[derive(Clone, Debug)]
pub struct ValueFacts {
    /// The dims, or `None` where the rank itself is unknown.
    pub dims: Option<Vec<Option<Dim>>>,
    /// The element type, where known.
    pub datum_type: Option<DatumType>,
    /// The value, where it is a constant (initializers and constant-folded shape arithmetic).
    pub konst: Option<Arc<Tensor>>,
}

impl ValueFacts {
    /// The rank, where known.
    pub fn rank(&self) -> Option<usize> {
        self.dims.as_ref().map(Vec::len)
    }

    /// The fixed size of `axis`, where known.
    pub fn dim(&self, axis: usize) -> Option<usize> {
        self.dims.as_ref()?.get(axis)?.as_ref()?.known()
    }

    /// The constant value as integers (shape, axes and pads inputs), where it is one.
    pub fn konst_i64(&self) -> Option<Vec<i64>> {
        let t = self.konst.as_ref()?;
        let t = t.cast_to::<i64>().ok()?;
        crate::values::<i64>(&t).ok()
    }
}

/// A parsed ONNX model with shape facts for its values.
pub struct OnnxGraph {
    /// The model as read (tract's prost binding of `onnx.proto`).
    pub proto: pb::ModelProto,
    facts: HashMap<String, ValueFacts>,
    initializers: HashMap<String, usize>,
    producers: HashMap<String, usize>,
    consumers: HashMap<String, Vec<usize>>,
}

impl OnnxGraph {
    /// Reads and analyses an ONNX file.
    pub fn read(path: &Path) -> Result<Self, OnnxError> {
        let bytes = std::fs::read(path).map_err(|source| OnnxError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|e| e.at(path))
    }

    /// Parses and analyses an ONNX model held in memory.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, OnnxError> {
        let proto = pb::ModelProto::decode(bytes).map_err(|source| OnnxError::Corrupt {
            path: None,
            reason: source.to_string(),
        })?;
        Self::from_proto(proto)
    }

    /// Analyses a decoded model.
    pub fn from_proto(proto: pb::ModelProto) -> Result<Self, OnnxError> {
        let graph = proto.graph.as_ref().ok_or_else(|| OnnxError::Corrupt {
            path: None,
            reason: "the model has no graph".into(),
        })?;
        for t in &graph.initializer {
            if t.data_location == Some(pb::tensor_proto::DataLocation::External as i32) {
                return Err(OnnxError::ExternalData {
                    tensor: t.name.clone(),
                });
            }
        }
        let onnx = tract_onnx::onnx();
        let mut parsed = onnx.parse(&proto, None).map_err(|e| OnnxError::Shapes {
            reason: format!("{e:#}"),
        })?;
        parsed.model.analyse(false).map_err(|e| OnnxError::Shapes {
            reason: format!("{e:#}"),
        })?;
        let mut facts = HashMap::new();
        for (name, outlet) in &parsed.outlets_by_name {
            let fact = parsed
                .model
                .outlet_fact(*outlet)
                .map_err(|e| OnnxError::Shapes {
                    reason: format!("{e:#}"),
                })?;
            facts.insert(name.clone(), value_facts(fact));
        }
        let initializers = graph
            .initializer
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let mut producers = HashMap::new();
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, node) in graph.node.iter().enumerate() {
            for o in node.output.iter().filter(|o| !o.is_empty()) {
                producers.insert(o.clone(), i);
            }
            for x in node.input.iter().filter(|x| !x.is_empty()) {
                consumers.entry(x.clone()).or_default().push(i);
            }
        }
        Ok(Self {
            proto,
            facts,
            initializers,
            producers,
            consumers,
        })
    }

    /// The graph (present: checked on reading).
    pub fn graph(&self) -> &pb::GraphProto {
        self.proto.graph.as_ref().expect("checked on reading")
    }

    /// The nodes, in the file's (topological) order.
    pub fn nodes(&self) -> &[pb::NodeProto] {
        &self.graph().node
    }

    /// The facts of a value; an empty fact for names tract did not see.
    pub fn facts(&self, name: &str) -> ValueFacts {
        self.facts.get(name).cloned().unwrap_or(ValueFacts {
            dims: None,
            datum_type: None,
            konst: None,
        })
    }

    /// The initializer of that name, if any.
    pub fn initializer(&self, name: &str) -> Option<&pb::TensorProto> {
        self.initializers
            .get(name)
            .map(|&i| &self.graph().initializer[i])
    }

    /// The index of the node that produces a value (none for inputs and initializers).
    pub fn producer(&self, name: &str) -> Option<usize> {
        self.producers.get(name).copied()
    }

    /// The nodes that read a value.
    pub fn consumers(&self, name: &str) -> &[usize] {
        self.consumers.get(name).map_or(&[], Vec::as_slice)
    }

    /// The graph inputs that are fed at run time (not initializers).
    pub fn runtime_inputs(&self) -> Vec<&pb::ValueInfoProto> {
        self.graph()
            .input
            .iter()
            .filter(|i| !self.initializers.contains_key(&i.name))
            .collect()
    }

    /// The integer attribute `name` of a node.
    pub fn attr_i(node: &pb::NodeProto, name: &str) -> Option<i64> {
        node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
    }

    /// The integer-list attribute `name` of a node.
    pub fn attr_ints(node: &pb::NodeProto, name: &str) -> Option<Vec<i64>> {
        node.attribute
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.ints.clone())
    }

    /// The string attribute `name` of a node.
    pub fn attr_s(node: &pb::NodeProto, name: &str) -> Option<String> {
        node.attribute
            .iter()
            .find(|a| a.name == name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
}

/// A node's display name: its ONNX name, or its first output where it has none.
pub fn node_label(node: &pb::NodeProto) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else {
        node.output.first().cloned().unwrap_or_default()
    }
}

fn value_facts(fact: &InferenceFact) -> ValueFacts {
    let dims = if fact.shape.is_open() {
        None
    } else {
        Some(
            fact.shape
                .dims()
                .map(|d| {
                    d.concretize().map(|d| match d.to_i64() {
                        Ok(n) if n >= 0 => Dim::Known(n as usize),
                        _ => Dim::Symbolic(d.to_string()),
                    })
                })
                .collect(),
        )
    };
    ValueFacts {
        dims,
        datum_type: fact.datum_type.concretize(),
        konst: fact.value.concretize(),
    }
}
