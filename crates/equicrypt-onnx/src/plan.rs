//! The channel-permutation pass: walks the graph in order, gives every linear layer's output a
//! fresh secret permutation, carries permutations through the ops that commute with them, and
//! records which constant tensor must be permuted along which axis. Rules: `docs/onnx.md`.
//!
//! Every value gets an *annotation*: per axis, the [`AxisPerm`] it is permuted by, or none.
//! Graph inputs are not permuted (the client's stem consumes them); an op whose inputs carry no
//! permutation is left alone (shape arithmetic, anything upstream of the first layer), except
//! the linear layers (`Conv`, `ConvTranspose`, `Gemm`, `MatMul` with a constant weight), whose
//! outputs always get a fresh variable. An op that meets a permuted input and is not proven
//! safe here stops the pass with an error naming the node.

use std::collections::{BTreeMap, HashMap, HashSet};

use tract_onnx::pb;

use crate::graph::{node_label, OnnxGraph};
use crate::vars::{AxisPerm, UnifyError, VarId, Vars};
use crate::OnnxError;

/// Per-axis permutations of one value.
pub type Ann = Vec<Option<AxisPerm>>;

/// The result of the pass.
#[derive(Clone, Debug)]
pub struct ChannelPlan {
    /// The permutation variables (joined).
    pub vars: Vars,
    /// Per value name, its annotation (values the pass annotated).
    pub ann: HashMap<String, Ann>,
    /// Constant values (initializers and `Constant` outputs) to permute: per name, per axis.
    pub rewrites: BTreeMap<String, BTreeMap<usize, AxisPerm>>,
    /// Values computed from constants alone.
    pub konst: HashSet<String>,
}

impl ChannelPlan {
    /// The annotation of a value, with representatives for variables; unpermuted (empty) for
    /// values the pass did not annotate.
    pub fn annotation(&self, name: &str) -> Ann {
        self.ann
            .get(name)
            .map(|a| {
                a.iter()
                    .map(|x| x.map(|ap| self.vars.canonical(ap)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether some axis of the value is permuted.
    pub fn is_permuted(&self, name: &str) -> bool {
        self.ann
            .get(name)
            .is_some_and(|a| a.iter().any(Option::is_some))
    }
}

/// Ops that act on each element alone (extra inputs, if any, broadcast like a binary op).
const ELEMENTWISE: &[&str] = &[
    "Identity",
    "Cast",
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
    "Softsign",
    "Gelu",
    "Mish",
    "Erf",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Neg",
    "Abs",
    "Sin",
    "Cos",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Not",
    "IsNaN",
    "IsInf",
    "Clip",
    "ThresholdedRelu",
    "Shrink",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Max",
    "Min",
    "Sum",
    "Mean",
    "Equal",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
    "And",
    "Or",
    "Xor",
    "Mod",
    "Where",
];

/// Ops that copy or move a constant without computing on it: a permutation requested on their
/// output is requested on their (first) input, along the corresponding axis.
const MOVES_CONSTANTS: &[&str] = &[
    "Identity",
    "Cast",
    "Expand",
    "Transpose",
    "Reshape",
    "Resize",
    "Slice",
];

/// Ops whose outputs carry no data of their input (shapes, sizes).
const SHAPE_ONLY: &[&str] = &["Shape", "Size"];

/// Pooling: a window over the spatial axes, per channel.
const POOLS: &[&str] = &[
    "MaxPool",
    "AveragePool",
    "LpPool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "GlobalLpPool",
];

/// Reductions: summing, averaging or maximizing over an axis forgets its order.
const REDUCTIONS: &[&str] = &[
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
];

/// Ops whose output along every axis is a function of the same index along that axis of the
/// input, and nothing else, when the output has the input's size there.
const SAME_SHAPE_ALONG_PERMUTED: &[&str] = &["Resize", "Upsample"];

/// Runs the pass over a graph.
pub fn plan(graph: &OnnxGraph) -> Result<ChannelPlan, OnnxError> {
    let mut p = Pass {
        g: graph,
        vars: Vars::default(),
        ann: HashMap::new(),
        konst: HashSet::new(),
        rewrites: BTreeMap::new(),
        requesters: HashMap::new(),
    };
    for t in &graph.graph().initializer {
        p.konst.insert(t.name.clone());
    }
    for (i, node) in graph.nodes().iter().enumerate() {
        p.node(i, node)?;
    }
    p.check_shared_constants()?;
    Ok(ChannelPlan {
        vars: p.vars,
        ann: p.ann,
        rewrites: p.rewrites,
        konst: p.konst,
    })
}

struct Pass<'g> {
    g: &'g OnnxGraph,
    vars: Vars,
    ann: HashMap<String, Ann>,
    konst: HashSet<String>,
    rewrites: BTreeMap<String, BTreeMap<usize, AxisPerm>>,
    /// Per rewritten constant, the nodes that asked for it.
    requesters: HashMap<String, HashSet<usize>>,
}

/// The inputs of a node, without the empty names of omitted optional inputs.
fn inputs(node: &pb::NodeProto) -> Vec<&str> {
    node.input
        .iter()
        .filter(|x| !x.is_empty())
        .map(String::as_str)
        .collect()
}

impl Pass<'_> {
    fn err(&self, node: &pb::NodeProto, reason: impl Into<String>) -> OnnxError {
        OnnxError::Unsupported {
            node: node_label(node),
            op: node.op_type.clone(),
            reason: reason.into(),
        }
    }

    fn rank(&self, node: &pb::NodeProto, name: &str) -> Result<usize, OnnxError> {
        if let Some(a) = self.ann.get(name) {
            return Ok(a.len());
        }
        self.g
            .facts(name)
            .rank()
            .ok_or_else(|| self.err(node, format!("the rank of `{name}` is not known")))
    }

    fn annotation(&self, node: &pb::NodeProto, name: &str) -> Result<Ann, OnnxError> {
        if let Some(a) = self.ann.get(name) {
            return Ok(a.clone());
        }
        Ok(vec![None; self.rank(node, name)?])
    }

    fn permuted(&self, name: &str) -> bool {
        self.ann
            .get(name)
            .is_some_and(|a| a.iter().any(Option::is_some))
    }

    fn dim(&self, name: &str, axis: usize) -> Option<usize> {
        self.g.facts(name).dim(axis)
    }

    fn set_plain_outputs(&mut self, node: &pb::NodeProto) {
        for o in node.output.iter().filter(|o| !o.is_empty()) {
            if let Some(r) = self.g.facts(o).rank() {
                self.ann.insert(o.clone(), vec![None; r]);
            }
        }
    }

    fn set_outputs(&mut self, node: &pb::NodeProto, anns: Vec<Ann>) {
        for (o, a) in node.output.iter().zip(anns) {
            if !o.is_empty() {
                self.ann.insert(o.clone(), a);
            }
        }
    }

    fn unify(&mut self, node: &pb::NodeProto, a: AxisPerm, b: AxisPerm) -> Result<(), OnnxError> {
        if a.outer != b.outer || a.inner != b.inner {
            return Err(self.err(
                node,
                "its inputs carry one permutation in two different layouts",
            ));
        }
        self.vars.unify(a.var, b.var).map_err(|e| match e {
            UnifyError::Size(x, y) => self.err(
                node,
                format!("its inputs join channel spaces of sizes {x} and {y}"),
            ),
            UnifyError::Parts => {
                self.err(node, "its inputs join concatenations of different parts")
            }
        })
    }

    /// Asks for constant `name` to be permuted by `ap` along `axis`.
    fn request(
        &mut self,
        node_ix: usize,
        node: &pb::NodeProto,
        name: &str,
        axis: usize,
        ap: AxisPerm,
    ) -> Result<(), OnnxError> {
        let n = ap.outer * self.vars.size(ap.var) * ap.inner;
        match self.dim(name, axis) {
            Some(1) => return Ok(()),
            Some(d) if d == n => {}
            d => {
                return Err(self.err(
                    node,
                    format!(
                    "constant `{name}` has size {} on axis {axis}, where the permuted axis has {n}",
                    d.map_or("?".to_string(), |d| d.to_string())
                ),
                ))
            }
        }
        self.request_from(node_ix, node, name, axis, ap)
    }

    /// Follows a constant operand back through the ops that only copy or move it (Identity,
    /// Cast, Expand, Transpose, Reshape, Resize, Slice, Concat) to the stored tensors, mapping
    /// the axis on the way, and records the permutation there.
    fn request_from(
        &mut self,
        requester: usize,
        node: &pb::NodeProto,
        source: &str,
        axis: usize,
        ap: AxisPerm,
    ) -> Result<(), OnnxError> {
        if self.dim(source, axis) == Some(1) {
            return Ok(());
        }
        if self.g.initializer(source).is_none() {
            let Some(pi) = self.g.producer(source) else {
                return Err(self.err(node, format!("`{source}` is neither a constant nor data")));
            };
            let producer = self.g.nodes()[pi].clone();
            let op = producer.op_type.as_str();
            if op != "Constant" {
                self.requesters
                    .entry(source.to_string())
                    .or_default()
                    .insert(requester);
                let src = producer.input[0].clone();
                let moved = |what: &str| {
                    self.err(
                        node,
                        format!(
                            "constant operand `{source}` is {what} ({op} node `{}`)",
                            node_label(&producer)
                        ),
                    )
                };
                let in_axis = match op {
                    "Identity" | "Cast" => axis,
                    "Expand" => {
                        let (ro, rs) = (self.rank(node, source)?, self.rank(node, &src)?);
                        match (axis + rs).checked_sub(ro) {
                            Some(a) => a,
                            None => return Ok(()),
                        }
                    }
                    "Transpose" => {
                        let r = self.rank(node, &src)?;
                        let perm: Vec<usize> = match OnnxGraph::attr_ints(&producer, "perm") {
                            Some(p) => p.iter().map(|&x| x as usize).collect(),
                            None => (0..r).rev().collect(),
                        };
                        *perm.get(axis).ok_or_else(|| moved("transposed oddly"))?
                    }
                    "Resize" | "Slice" => {
                        if self.dim(&src, axis).is_none()
                            || self.dim(&src, axis) != self.dim(source, axis)
                        {
                            return Err(moved("resized or sliced along the permuted axis"));
                        }
                        axis
                    }
                    "Reshape" => {
                        let (Some(dx), Some(dy)) =
                            (self.g.facts(&src).dims, self.g.facts(source).dims)
                        else {
                            return Err(moved("reshaped with unknown shapes"));
                        };
                        let known = |d: &[Option<crate::graph::Dim>]| -> Option<usize> {
                            d.iter()
                                .map(|d| d.as_ref().and_then(|d| d.known()))
                                .product()
                        };
                        let want = (
                            dy[axis].as_ref().and_then(|d| d.known()),
                            known(&dy[axis + 1..]),
                        );
                        (0..dx.len())
                            .find(|&k| {
                                (dx[k].as_ref().and_then(|d| d.known()), known(&dx[k + 1..]))
                                    == want
                            })
                            .ok_or_else(|| moved("reshaped across the permuted axis"))?
                    }
                    "Concat" => {
                        let r = self.rank(node, source)? as i64;
                        let c = OnnxGraph::attr_i(&producer, "axis").unwrap_or(0);
                        let c = if c < 0 { c + r } else { c } as usize;
                        if c == axis {
                            return Err(moved("concatenated along the permuted axis"));
                        }
                        for x in producer.input.iter().filter(|x| !x.is_empty()) {
                            self.request_from(pi, node, x, axis, ap)?;
                        }
                        return Ok(());
                    }
                    _ => return Err(moved("computed")),
                };
                return self.request_from(pi, node, &src, in_axis, ap);
            }
        }
        let source = source.to_string();
        self.requesters
            .entry(source.clone())
            .or_default()
            .insert(requester);
        // A constant that is the same along the axis needs no permutation (and so joins
        // nothing: exporters share one tensor of ones between many normalizations).
        let stored = match self.g.initializer(&source) {
            Some(t) => Some(t),
            None => self.g.producer(&source).and_then(|p| {
                self.g.nodes()[p]
                    .attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.as_ref())
            }),
        };
        if stored.is_some_and(|t| crate::tensor::is_uniform_along(t, axis)) {
            return Ok(());
        }
        let slot = self.rewrites.entry(source).or_default();
        match slot.get(&axis).copied() {
            None => {
                slot.insert(axis, ap);
            }
            Some(prev) => self.unify(node, prev, ap)?,
        }
        Ok(())
    }

    /// Numpy broadcasting over `names`: permuted axes must line up; constants are permuted to
    /// match, other unpermuted data of full size on a permuted axis is refused.
    fn broadcast(
        &mut self,
        ix: usize,
        node: &pb::NodeProto,
        names: &[&str],
        out_rank: usize,
    ) -> Result<Ann, OnnxError> {
        let mut anns = Vec::with_capacity(names.len());
        for n in names {
            let a = self.annotation(node, n)?;
            if a.len() > out_rank {
                return Err(self.err(node, format!("`{n}` has a higher rank than the output")));
            }
            anns.push(a);
        }
        let mut out = vec![None; out_rank];
        for (k, slot) in out.iter_mut().enumerate() {
            let mut chosen: Option<AxisPerm> = None;
            for a in &anns {
                let Some(ax) = (k + a.len()).checked_sub(out_rank) else {
                    continue;
                };
                if let Some(ap) = a[ax] {
                    match chosen {
                        None => chosen = Some(ap),
                        Some(c) => self.unify(node, c, ap)?,
                    }
                }
            }
            let Some(c) = chosen else { continue };
            for (n, a) in names.iter().zip(&anns) {
                let Some(ax) = (k + a.len()).checked_sub(out_rank) else {
                    continue;
                };
                if a[ax].is_some() || self.dim(n, ax) == Some(1) {
                    continue;
                }
                if self.rewritable(n) {
                    self.request(ix, node, n, ax, c)?;
                } else {
                    return Err(self.err(
                        node,
                        format!("input `{n}` is not permuted on an axis where another input is"),
                    ));
                }
            }
            *slot = Some(c);
        }
        Ok(out)
    }

    fn require_unpermuted(
        &self,
        node: &pb::NodeProto,
        ann: &Ann,
        axes: impl IntoIterator<Item = usize>,
        what: &str,
    ) -> Result<(), OnnxError> {
        for a in axes {
            if ann.get(a).copied().flatten().is_some() {
                return Err(self.err(node, format!("axis {a} ({what}) is permuted")));
            }
        }
        Ok(())
    }

    fn constant_weight(&self, node: &pb::NodeProto, name: &str) -> Result<(), OnnxError> {
        if self.konst.contains(name) {
            Ok(())
        } else {
            Err(self.err(node, format!("weight `{name}` is not a constant")))
        }
    }

    fn channel(
        &self,
        node: &pb::NodeProto,
        ap: Option<AxisPerm>,
    ) -> Result<Option<AxisPerm>, OnnxError> {
        match ap {
            Some(ap) if ap.outer != 1 || ap.inner != 1 => Err(self.err(
                node,
                "its channel axis mixes a permuted channel space with other axes",
            )),
            _ => Ok(ap),
        }
    }

    fn node(&mut self, ix: usize, node: &pb::NodeProto) -> Result<(), OnnxError> {
        let ins = inputs(node);
        if ins.iter().all(|x| self.konst.contains(*x)) {
            for o in node.output.iter().filter(|o| !o.is_empty()) {
                self.konst.insert(o.clone());
            }
            self.set_plain_outputs(node);
            return Ok(());
        }
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            if ins.iter().any(|x| self.permuted(x)) {
                return Err(self.err(
                    node,
                    format!("operator domain `{}` is not supported", node.domain),
                ));
            }
            self.set_plain_outputs(node);
            return Ok(());
        }
        let op = node.op_type.as_str();
        let creates = matches!(op, "Conv" | "ConvTranspose" | "Gemm" | "MatMul");
        if SHAPE_ONLY.contains(&op) || (!creates && !ins.iter().any(|x| self.permuted(x))) {
            self.set_plain_outputs(node);
            return Ok(());
        }
        let out0 = node.output.first().map(String::as_str).unwrap_or_default();
        let anns: Vec<Ann> = match op {
            "Dropout" => {
                let a = self.annotation(node, ins[0])?;
                vec![a.clone(), a]
            }
            _ if ELEMENTWISE.contains(&op) => {
                let r = self.rank(node, out0)?;
                vec![self.broadcast(ix, node, &ins, r)?]
            }
            "Conv" | "ConvTranspose" => vec![self.conv(ix, node, &ins)?],
            "BatchNormalization" | "InstanceNormalization" => {
                if node.output.iter().filter(|o| !o.is_empty()).count() > 1 {
                    return Err(self.err(node, "training-mode outputs are not supported"));
                }
                let a = self.annotation(node, ins[0])?;
                // Instance norm's statistics are sums over all the spatial axes, which any
                // permutation of them leaves alone (GroupNorm exports reshape channels there).
                let spatial_free = op == "InstanceNormalization";
                let last = if spatial_free { 1 } else { a.len() };
                self.require_unpermuted(
                    node,
                    &a,
                    std::iter::once(0).chain(2..last),
                    "batch or spatial",
                )?;
                if let Some(c) = self.channel(node, a.get(1).copied().flatten())? {
                    for p in &ins[1..] {
                        self.request(ix, node, p, 0, c)?;
                    }
                }
                vec![a]
            }
            "LayerNormalization" => {
                let a = self.annotation(node, ins[0])?;
                let r = a.len() as i64;
                let axis = OnnxGraph::attr_i(node, "axis").unwrap_or(-1);
                let axis = if axis < 0 { axis + r } else { axis } as usize;
                for (k, ap) in a.iter().enumerate().skip(axis) {
                    let Some(ap) = ap else { continue };
                    for p in &ins[1..] {
                        let pr = self.rank(node, p)?;
                        if let Some(pk) = (k + pr).checked_sub(a.len()) {
                            self.request(ix, node, p, pk, *ap)?;
                        }
                    }
                }
                let mut outs = vec![a.clone()];
                let stats: Ann = a
                    .iter()
                    .enumerate()
                    .map(|(k, x)| if k < axis { *x } else { None })
                    .collect();
                for _ in 1..node.output.len() {
                    outs.push(stats.clone());
                }
                outs
            }
            _ if POOLS.contains(&op) => {
                if node.output.iter().filter(|o| !o.is_empty()).count() > 1 {
                    return Err(self.err(node, "pooling indices are not supported"));
                }
                let a = self.annotation(node, ins[0])?;
                self.require_unpermuted(
                    node,
                    &a,
                    std::iter::once(0).chain(2..a.len()),
                    "batch or spatial",
                )?;
                self.channel(node, a.get(1).copied().flatten())?;
                vec![a]
            }
            "Softmax" | "LogSoftmax" | "Hardmax" => vec![self.annotation(node, ins[0])?],
            _ if REDUCTIONS.contains(&op) || op == "ArgMax" || op == "ArgMin" => {
                vec![self.reduce(node, &ins)?]
            }
            "Flatten" | "Reshape" | "Squeeze" | "Unsqueeze" => {
                vec![self.reshape(node, ins[0], out0)?]
            }
            "Einsum" => vec![self.einsum(ix, node, &ins)?],
            "Transpose" => {
                let a = self.annotation(node, ins[0])?;
                let perm: Vec<usize> = match OnnxGraph::attr_ints(node, "perm") {
                    Some(p) => p.iter().map(|&x| x as usize).collect(),
                    None => (0..a.len()).rev().collect(),
                };
                if perm.len() != a.len() || perm.iter().any(|&k| k >= a.len()) {
                    return Err(self.err(node, "its perm does not match the input's rank"));
                }
                vec![perm.iter().map(|&k| a[k]).collect()]
            }
            "Gemm" => vec![self.gemm(ix, node, &ins)?],
            "MatMul" => vec![self.matmul(ix, node, &ins)?],
            "Concat" => vec![self.concat(ix, node, &ins, out0)?],
            "Pad" => {
                let a = self.annotation(node, ins[0])?;
                let pads = match ins.get(1) {
                    Some(p) => self.g.facts(p).konst_i64(),
                    None => OnnxGraph::attr_ints(node, "pads"),
                };
                let Some(pads) = pads else {
                    return Err(self.err(node, "its pads are not constant"));
                };
                let axes: Vec<usize> = match ins.get(3) {
                    Some(x) => match self.g.facts(x).konst_i64() {
                        Some(v) => v
                            .iter()
                            .map(|&k| if k < 0 { k + a.len() as i64 } else { k } as usize)
                            .collect(),
                        None => return Err(self.err(node, "its axes are not constant")),
                    },
                    None => (0..a.len()).collect(),
                };
                if pads.len() != 2 * axes.len() {
                    return Err(self.err(node, "its pads do not match its axes"));
                }
                for (j, &k) in axes.iter().enumerate() {
                    if a.get(k).copied().flatten().is_some()
                        && (pads[j] != 0 || pads[j + axes.len()] != 0)
                    {
                        return Err(self.err(node, format!("it pads permuted axis {k}")));
                    }
                }
                vec![a]
            }
            "Slice" => {
                let a = self.annotation(node, ins[0])?;
                let steps = ins.get(4).map(|s| self.g.facts(s).konst_i64());
                for (k, ap) in a.iter().enumerate() {
                    if ap.is_none() {
                        continue;
                    }
                    let same =
                        self.dim(ins[0], k).is_some() && self.dim(ins[0], k) == self.dim(out0, k);
                    let forward = match &steps {
                        None => true,
                        Some(Some(s)) => s.iter().all(|&s| s > 0),
                        Some(None) => false,
                    };
                    if !same || !forward {
                        return Err(self.err(node, format!("it slices permuted axis {k}")));
                    }
                }
                vec![a]
            }
            _ if SAME_SHAPE_ALONG_PERMUTED.contains(&op) => {
                let a = self.annotation(node, ins[0])?;
                for (k, ap) in a.iter().enumerate() {
                    if ap.is_some()
                        && (self.dim(ins[0], k).is_none()
                            || self.dim(ins[0], k) != self.dim(out0, k))
                    {
                        return Err(self.err(node, format!("it resizes permuted axis {k}")));
                    }
                }
                vec![a]
            }
            "Gather" => {
                let a = self.annotation(node, ins[0])?;
                if self.permuted(ins[1]) {
                    return Err(self.err(node, "its indices are permuted"));
                }
                let r = a.len() as i64;
                let axis = OnnxGraph::attr_i(node, "axis").unwrap_or(0);
                let axis = if axis < 0 { axis + r } else { axis } as usize;
                if a.get(axis).copied().flatten().is_some() {
                    return Err(self.err(node, format!("it gathers along permuted axis {axis}")));
                }
                let idx_rank = self.rank(node, ins[1])?;
                let mut out = a[..axis].to_vec();
                out.extend(std::iter::repeat_n(None, idx_rank));
                out.extend_from_slice(&a[axis + 1..]);
                vec![out]
            }
            "Expand" => {
                let a = self.annotation(node, ins[0])?;
                let r = self.rank(node, out0)?;
                let mut out = vec![None; r];
                for (k, ap) in a.iter().enumerate() {
                    let ok = k + r - a.len();
                    if ap.is_some() && self.dim(ins[0], k) != self.dim(out0, ok) {
                        return Err(self.err(node, format!("it expands permuted axis {k}")));
                    }
                    out[ok] = *ap;
                }
                vec![out]
            }
            "Tile" => {
                let a = self.annotation(node, ins[0])?;
                let Some(reps) = self.g.facts(ins[1]).konst_i64() else {
                    return Err(self.err(node, "its repeats are not constant"));
                };
                for (k, ap) in a.iter().enumerate() {
                    if ap.is_some() && reps.get(k) != Some(&1) {
                        return Err(self.err(node, format!("it tiles permuted axis {k}")));
                    }
                }
                vec![a]
            }
            "Split" => {
                let a = self.annotation(node, ins[0])?;
                let r = a.len() as i64;
                let axis = OnnxGraph::attr_i(node, "axis").unwrap_or(0);
                let axis = if axis < 0 { axis + r } else { axis } as usize;
                let outs: Vec<&String> = node.output.iter().filter(|o| !o.is_empty()).collect();
                match a.get(axis).copied().flatten() {
                    None => vec![a; node.output.len()],
                    Some(ap) if ap.outer == 1 && ap.inner == 1 => {
                        // Each part of the axis gets its own permutation: the axis' one becomes
                        // their direct sum.
                        let sizes: Option<Vec<usize>> =
                            outs.iter().map(|o| self.dim(o, axis)).collect();
                        let Some(sizes) = sizes else {
                            return Err(self.err(node, "the sizes of its parts are not known"));
                        };
                        let parts = self.vars.split_into(ap.var, &sizes).map_err(|_| {
                            self.err(
                                node,
                                format!("permuted axis {axis} cannot be split into {sizes:?}"),
                            )
                        })?;
                        parts
                            .into_iter()
                            .map(|v| {
                                let mut o = a.clone();
                                o[axis] = Some(AxisPerm::plain(v));
                                o
                            })
                            .collect()
                    }
                    Some(_) => {
                        return Err(self.err(node, format!("it splits permuted axis {axis}")))
                    }
                }
            }
            _ => {
                return Err(self.err(
                    node,
                    "the pass does not know how this op treats a permuted input",
                ));
            }
        };
        self.set_outputs(node, anns);
        Ok(())
    }

    /// A fresh variable for a linear layer's output axis of size `n`; none for a single
    /// channel, which no permutation can hide.
    fn fresh_output(&mut self, n: usize) -> Option<AxisPerm> {
        (n > 1).then(|| AxisPerm::plain(self.vars.fresh(n)))
    }

    /// Whether `name` is a constant, or a broadcast (`Expand`) or copy of one, so that the
    /// stored tensor can be permuted for it.
    fn rewritable(&self, name: &str) -> bool {
        if self.konst.contains(name) {
            return true;
        }
        if self.permuted(name) {
            return false;
        }
        match self.g.producer(name).map(|p| &self.g.nodes()[p]) {
            Some(p) if p.op_type == "Concat" => p
                .input
                .iter()
                .filter(|x| !x.is_empty())
                .all(|x| self.rewritable(x)),
            Some(p) if MOVES_CONSTANTS.contains(&p.op_type.as_str()) => {
                self.rewritable(&p.input[0])
            }
            _ => false,
        }
    }

    fn conv(&mut self, ix: usize, node: &pb::NodeProto, ins: &[&str]) -> Result<Ann, OnnxError> {
        let transpose = node.op_type == "ConvTranspose";
        let x = self.annotation(node, ins[0])?;
        if x.len() < 3 {
            return Err(self.err(node, "its input has rank below 3"));
        }
        self.require_unpermuted(
            node,
            &x,
            std::iter::once(0).chain(2..x.len()),
            "batch or spatial",
        )?;
        let w = ins
            .get(1)
            .copied()
            .ok_or_else(|| self.err(node, "it has no weight"))?;
        self.constant_weight(node, w)?;
        let sigma = self.channel(node, x[1])?;
        let group = OnnxGraph::attr_i(node, "group").unwrap_or(1).max(1) as usize;
        let c_in = self.dim(ins[0], 1);
        // Weight layout: Conv [M, C/g, k…], ConvTranspose [C, M/g, k…].
        let (in_axis, out_axis) = if transpose { (0, 1) } else { (1, 0) };
        let m = if transpose {
            self.dim(w, 1).map(|d| d * group)
        } else {
            self.dim(w, 0)
        };
        let Some(m) = m else {
            return Err(self.err(node, "its weight shape is not known"));
        };
        let out = if group == 1 {
            if let Some(s) = sigma {
                self.request(ix, node, w, in_axis, s)?;
            }
            let tau = self.fresh_output(m);
            if let Some(t) = tau {
                self.request(ix, node, w, out_axis, t)?;
            }
            tau
        } else if Some(group) == c_in && m == group {
            // Depthwise, one filter per channel: output channel c reads input channel c only,
            // so the output carries the input's permutation.
            if let Some(s) = sigma {
                self.request(ix, node, w, 0, s)?;
            }
            sigma
        } else {
            return Err(self.err(
                node,
                format!("grouped convolution with {group} groups (other than depthwise) is not supported"),
            ));
        };
        if let (Some(b), Some(t)) = (ins.get(2), out) {
            self.request(ix, node, b, 0, t)?;
        }
        let mut ann = vec![None; x.len()];
        ann[1] = out;
        Ok(ann)
    }

    fn gemm(&mut self, ix: usize, node: &pb::NodeProto, ins: &[&str]) -> Result<Ann, OnnxError> {
        let a = self.annotation(node, ins[0])?;
        if a.len() != 2 {
            return Err(self.err(node, "its first input is not a matrix"));
        }
        let b = ins[1];
        self.constant_weight(node, b)?;
        let trans_a = OnnxGraph::attr_i(node, "transA").unwrap_or(0) != 0;
        let trans_b = OnnxGraph::attr_i(node, "transB").unwrap_or(0) != 0;
        let (m_axis, k_axis) = if trans_a { (1, 0) } else { (0, 1) };
        let (bk, bn) = if trans_b { (1, 0) } else { (0, 1) };
        if let Some(k) = a[k_axis] {
            self.request(ix, node, b, bk, k)?;
        }
        let n = self
            .dim(b, bn)
            .ok_or_else(|| self.err(node, "its weight shape is not known"))?;
        let tau = self.fresh_output(n);
        if let Some(t) = tau {
            self.request(ix, node, b, bn, t)?;
        }
        let out = vec![a[m_axis], tau];
        if let Some(c) = ins.get(2) {
            let cr = self.rank(node, c)?;
            if let (true, Some(t)) = (cr >= 1, tau) {
                self.request(ix, node, c, cr - 1, t)?;
            }
            if cr == 2 {
                if let Some(mp) = a[m_axis] {
                    self.request(ix, node, c, 0, mp)?;
                }
            }
        }
        Ok(out)
    }

    fn matmul(&mut self, ix: usize, node: &pb::NodeProto, ins: &[&str]) -> Result<Ann, OnnxError> {
        let (x, y) = (ins[0], ins[1]);
        let xa = self.annotation(node, x)?;
        let ya = self.annotation(node, y)?;
        if xa.len() < 2 || ya.len() < 2 {
            return Err(self.err(node, "vector operands are not supported"));
        }
        let (xr, yr) = (xa.len(), ya.len());
        let r = xr.max(yr);
        let batch = |a: &Ann, k: usize| (k + a.len()).checked_sub(r).and_then(|i| a[i]);
        let (m, n) = if self.konst.contains(y) && yr == 2 {
            // x · W: W's rows meet x's last axis; its columns get a fresh permutation.
            if let Some(k) = xa[xr - 1] {
                self.request(ix, node, y, 0, k)?;
            }
            let nn = self
                .dim(y, 1)
                .ok_or_else(|| self.err(node, "its weight shape is not known"))?;
            let tau = self.fresh_output(nn);
            if let Some(t) = tau {
                self.request(ix, node, y, 1, t)?;
            }
            (xa[xr - 2], tau)
        } else if self.konst.contains(x) && xr == 2 {
            // W · y: W's columns meet y's rows; its rows get a fresh permutation.
            if let Some(k) = ya[yr - 2] {
                self.request(ix, node, x, 1, k)?;
            }
            let mm = self
                .dim(x, 0)
                .ok_or_else(|| self.err(node, "its weight shape is not known"))?;
            let tau = self.fresh_output(mm);
            if let Some(t) = tau {
                self.request(ix, node, x, 0, t)?;
            }
            (tau, ya[yr - 1])
        } else {
            // Two data operands: the contracted axes must carry one permutation.
            match (xa[xr - 1], ya[yr - 2]) {
                (None, None) => {}
                (Some(p), Some(q)) => self.unify(node, p, q)?,
                _ => return Err(self.err(node, "only one side of the contracted axis is permuted")),
            }
            (xa[xr - 2], ya[yr - 1])
        };
        let mut out = vec![None; r];
        for (k, slot) in out.iter_mut().enumerate().take(r - 2) {
            match (batch(&xa, k), batch(&ya, k)) {
                (Some(p), Some(q)) => {
                    self.unify(node, p, q)?;
                    *slot = Some(p);
                }
                (p, q) => *slot = p.or(q),
            }
        }
        out[r - 2] = m;
        out[r - 1] = n;
        Ok(out)
    }

    fn reduce(&self, node: &pb::NodeProto, ins: &[&str]) -> Result<Ann, OnnxError> {
        let a = self.annotation(node, ins[0])?;
        let r = a.len() as i64;
        let arg = node.op_type.starts_with("Arg");
        let axes: Vec<i64> = if arg {
            vec![OnnxGraph::attr_i(node, "axis").unwrap_or(0)]
        } else if let Some(ax) = OnnxGraph::attr_ints(node, "axes") {
            ax
        } else if let Some(x) = ins.get(1) {
            self.g
                .facts(x)
                .konst_i64()
                .ok_or_else(|| self.err(node, "its axes are not constant"))?
        } else if OnnxGraph::attr_i(node, "noop_with_empty_axes").unwrap_or(0) != 0 {
            return Ok(a);
        } else {
            (0..r).collect()
        };
        let axes: HashSet<usize> = axes
            .iter()
            .map(|&k| if k < 0 { k + r } else { k } as usize)
            .collect();
        if arg && axes.iter().any(|&k| a.get(k).copied().flatten().is_some()) {
            return Err(self.err(node, "its result would be an index into a permuted axis"));
        }
        let keep = OnnxGraph::attr_i(node, "keepdims").unwrap_or(1) != 0;
        let mut out = Vec::new();
        for (k, ap) in a.iter().enumerate() {
            if axes.contains(&k) {
                if keep {
                    out.push(None);
                }
            } else {
                out.push(*ap);
            }
        }
        Ok(out)
    }

    /// Reshapes move permuted digits between axes. A digit that falls whole inside one output
    /// axis keeps its variable. A digit split over several output axes (hidden → heads × head
    /// dim, channels → groups × channels per group) factors its variable into a Kronecker
    /// product, one factor per axis. Digits that meet in one output axis, adjacent, merge into
    /// the product of their variables.
    fn reshape(&mut self, node: &pb::NodeProto, x: &str, y: &str) -> Result<Ann, OnnxError> {
        let a = self.annotation(node, x)?;
        let fx = self.g.facts(x);
        let fy = self.g.facts(y);
        let (Some(dx), Some(dy)) = (fx.dims.clone(), fy.dims.clone()) else {
            return Err(self.err(node, "the shapes around it are not known"));
        };
        let cut = |k: usize| format!("it cuts permuted axis {k} off its boundaries");
        // (output axis, variable, size, inner stride within that axis), per digit part.
        let mut parts: Vec<(usize, VarId, usize, usize)> = Vec::new();
        for (k, ap) in a.iter().enumerate() {
            let Some(ap) = ap else { continue };
            let hidden = || self.err(node, format!("a dynamic shape hides permuted axis {k}"));
            let mut pos = ap.inner;
            for d in &dx[k + 1..] {
                pos *= d.as_ref().and_then(|d| d.known()).ok_or_else(hidden)?;
            }
            let mut remaining = self.vars.size(ap.var);
            // Digit pieces from the least significant output axis up: (axis, size, inner).
            let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
            let mut suffix = 1usize;
            for b in (0..dy.len()).rev() {
                let Some(db) = dy[b].as_ref().and_then(|d| d.known()) else {
                    // A symbolic axis (the batch, with heads folded into it): the digit lands
                    // here whole, with an unknown number of copies above it.
                    if !pos.is_multiple_of(suffix) || dy[b].is_none() {
                        return Err(hidden());
                    }
                    pieces.push((b, remaining, pos / suffix));
                    remaining = 1;
                    break;
                };
                let end = suffix * db;
                if pos >= end {
                    suffix = end;
                    continue;
                }
                if !pos.is_multiple_of(suffix) || !end.is_multiple_of(pos) {
                    return Err(self.err(node, cut(k)));
                }
                let cap = end / pos;
                let inner = pos / suffix;
                if remaining <= cap {
                    if !cap.is_multiple_of(remaining) {
                        return Err(self.err(node, cut(k)));
                    }
                    pieces.push((b, remaining, inner));
                    remaining = 1;
                    break;
                }
                if !remaining.is_multiple_of(cap) {
                    return Err(self.err(node, cut(k)));
                }
                pieces.push((b, cap, inner));
                remaining /= cap;
                pos = end;
                suffix = end;
            }
            if remaining != 1 || pieces.is_empty() {
                return Err(self.err(node, format!("permuted axis {k} does not fit its output")));
            }
            // Factor the variable, most significant piece first.
            let mut var = ap.var;
            for idx in (1..pieces.len()).rev() {
                let (b, size, inner) = pieces[idx];
                let (major, minor) = self.vars.factor(var, size).map_err(|_| {
                    self.err(
                        node,
                        format!("permuted axis {k} cannot be split as the reshape needs"),
                    )
                })?;
                parts.push((b, major, size, inner));
                var = minor;
            }
            let (b, size, inner) = pieces[0];
            parts.push((b, var, size, inner));
        }
        let mut out: Ann = vec![None; dy.len()];
        for (b, slot) in out.iter_mut().enumerate() {
            let mut here: Vec<(VarId, usize, usize)> = parts
                .iter()
                .filter(|p| p.0 == b)
                .map(|p| (p.1, p.2, p.3))
                .collect();
            if here.is_empty() {
                continue;
            }
            here.sort_by_key(|p| p.2);
            let (mut var, mut size, inner) = here[0];
            for &(v, n, i) in &here[1..] {
                if i != inner * size {
                    return Err(self.err(node, "it merges permuted axes that are not adjacent"));
                }
                var = self.vars.kron(v, var);
                size *= n;
            }
            // `outer` 0: an unknown number of copies (a symbolic axis).
            let outer = dy[b]
                .as_ref()
                .and_then(|d| d.known())
                .map_or(0, |db| db / (size * inner));
            *slot = Some(AxisPerm { var, outer, inner });
        }
        Ok(out)
    }

    /// Einsum: every letter carries one permutation across the operands (unified); constant
    /// operands are permuted to match; the output's letters keep theirs.
    fn einsum(&mut self, ix: usize, node: &pb::NodeProto, ins: &[&str]) -> Result<Ann, OnnxError> {
        let eq = OnnxGraph::attr_s(node, "equation")
            .unwrap_or_default()
            .replace(' ', "");
        let Some((lhs, rhs)) = eq.split_once("->") else {
            return Err(self.err(node, "only explicit equations (with `->`) are supported"));
        };
        if eq.contains('.') {
            return Err(self.err(node, "ellipses are not supported"));
        }
        let terms: Vec<&str> = lhs.split(',').collect();
        if terms.len() != ins.len() {
            return Err(self.err(node, "its equation does not match its inputs"));
        }
        let mut letter: HashMap<char, AxisPerm> = HashMap::new();
        for (x, t) in ins.iter().zip(&terms) {
            let a = self.annotation(node, x)?;
            if a.len() != t.len() {
                return Err(self.err(
                    node,
                    format!("`{x}` does not have the rank its term `{t}` says"),
                ));
            }
            for (c, ap) in t.chars().zip(a) {
                if let Some(ap) = ap {
                    match letter.get(&c).copied() {
                        None => {
                            letter.insert(c, ap);
                        }
                        Some(prev) => self.unify(node, prev, ap)?,
                    }
                }
            }
        }
        for (x, t) in ins.iter().zip(&terms) {
            let a = self.annotation(node, x)?;
            for (k, (c, ap)) in t.chars().zip(a).enumerate() {
                let Some(want) = letter.get(&c).copied() else {
                    continue;
                };
                if ap.is_some() || self.dim(x, k) == Some(1) {
                    continue;
                }
                if self.rewritable(x) {
                    self.request(ix, node, x, k, want)?;
                } else {
                    return Err(self.err(
                        node,
                        format!("`{x}` is not permuted on letter `{c}` where another operand is"),
                    ));
                }
            }
        }
        Ok(rhs.chars().map(|c| letter.get(&c).copied()).collect())
    }

    fn concat(
        &mut self,
        ix: usize,
        node: &pb::NodeProto,
        ins: &[&str],
        out0: &str,
    ) -> Result<Ann, OnnxError> {
        let r = self.rank(node, out0)?;
        let axis = OnnxGraph::attr_i(node, "axis").unwrap_or(0);
        let axis = if axis < 0 { axis + r as i64 } else { axis } as usize;
        let mut out = self.broadcast_except(ix, node, ins, r, axis)?;
        let mut parts = Vec::with_capacity(ins.len());
        for x in ins {
            let a = self.annotation(node, x)?;
            let size = self.dim(x, axis).ok_or_else(|| {
                self.err(
                    node,
                    format!("the size of `{x}` on the concatenated axis is not known"),
                )
            })?;
            parts.push((a.get(axis).copied().flatten(), size));
        }
        if parts.iter().any(|p| p.0.is_some()) {
            out[axis] = Some(AxisPerm::plain(self.vars.sum(parts)));
        }
        Ok(out)
    }

    /// Broadcasting rules on every axis but `skip` (the concatenated one); no size-1 axes there.
    fn broadcast_except(
        &mut self,
        ix: usize,
        node: &pb::NodeProto,
        ins: &[&str],
        r: usize,
        skip: usize,
    ) -> Result<Ann, OnnxError> {
        let mut out = vec![None; r];
        for (k, slot) in out.iter_mut().enumerate() {
            if k == skip {
                continue;
            }
            let mut chosen = None;
            for x in ins {
                if let Some(ap) = self.annotation(node, x)?[k] {
                    match chosen {
                        None => chosen = Some(ap),
                        Some(c) => self.unify(node, c, ap)?,
                    }
                }
            }
            let Some(c) = chosen else { continue };
            for x in ins {
                if self.annotation(node, x)?[k].is_some() {
                    continue;
                }
                if self.rewritable(x) {
                    self.request(ix, node, x, k, c)?;
                } else {
                    return Err(self.err(
                        node,
                        format!("input `{x}` is not permuted on axis {k} where another input is"),
                    ));
                }
            }
            *slot = Some(c);
        }
        Ok(out)
    }

    /// Every node that reads a rewritten constant must have asked for it: a constant shared
    /// with a node that expects it unpermuted cannot be rewritten in place.
    fn check_shared_constants(&self) -> Result<(), OnnxError> {
        let mut stack: Vec<String> = self.rewrites.keys().cloned().collect();
        let mut seen = HashSet::new();
        while let Some(name) = stack.pop() {
            if !seen.insert(name.clone()) {
                continue;
            }
            let asked = self.requesters.get(&name);
            for &c in self.g.consumers(&name) {
                // `Shape` and `Size` read only the shape, which a permutation keeps.
                if SHAPE_ONLY.contains(&self.g.nodes()[c].op_type.as_str()) {
                    continue;
                }
                if !asked.is_some_and(|s| s.contains(&c)) {
                    let node = &self.g.nodes()[c];
                    return Err(OnnxError::SharedConstant {
                        tensor: name.clone(),
                        node: node_label(node),
                    });
                }
                let node = &self.g.nodes()[c];
                // Continue through the ops the request walked through (their outputs were
                // asked for too), not through the nodes that consumed the constant.
                let moved =
                    MOVES_CONSTANTS.contains(&node.op_type.as_str()) || node.op_type == "Concat";
                if moved && node.output.iter().any(|o| self.requesters.contains_key(o)) {
                    stack.extend(node.output.iter().cloned());
                }
            }
        }
        Ok(())
    }
}

/// The variable ids a plan's annotation of `name` refers to (representatives).
pub fn vars_of(plan: &ChannelPlan, name: &str) -> Vec<VarId> {
    plan.annotation(name)
        .iter()
        .flatten()
        .map(|ap| ap.var)
        .collect()
}
