//! Property tests on tiny random CNNs built here as ONNX graphs: for random weights, inputs and
//! keys, the encrypted pipeline (client stem → server model → decryption, both in tract) equals
//! the plaintext model to float rounding, and the server never sees an unpermuted activation.
//! Plus the pass's refusals: each names the node, and nothing is written.

use std::path::Path;

use equicrypt_core::SecretKey;
use equicrypt_onnx::eval::run_tract;
use equicrypt_onnx::{encrypt_onnx, OnnxError};
use proptest::prelude::*;
use prost::Message;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tract_onnx::pb;
use tract_onnx::prelude::*;

struct Builder {
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    rng: ChaCha8Rng,
}

fn attr_i(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

impl Builder {
    fn new(seed: u64) -> Self {
        Self {
            nodes: vec![],
            inits: vec![],
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    fn uniform(&mut self) -> f32 {
        (self.rng.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0
    }

    fn init(&mut self, name: &str, dims: &[i64], scale: f32, offset: f32) -> String {
        let n: i64 = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|_| offset + scale * self.uniform()).collect();
        self.inits.push(pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    fn int_init(&mut self, name: &str, values: &[i64]) -> String {
        self.inits.push(pb::TensorProto {
            name: name.into(),
            dims: vec![values.len() as i64],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            int64_data: values.to_vec(),
            ..Default::default()
        });
        name.into()
    }

    fn node(&mut self, op: &str, ins: &[&str], attrs: Vec<pb::AttributeProto>) -> String {
        let out = format!("{}_{}", op.to_lowercase(), self.nodes.len());
        self.nodes.push(pb::NodeProto {
            input: ins.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: format!("/{op}_{}", self.nodes.len()),
            op_type: op.into(),
            ..Default::default()
        });
        self.nodes.last_mut().unwrap().attribute = attrs;
        out
    }

    fn conv(&mut self, x: &str, c_in: i64, c_out: i64, k: i64, group: i64) -> String {
        let i = self.nodes.len();
        let w = self.init(&format!("w{i}"), &[c_out, c_in / group, k, k], 0.5, 0.0);
        let b = self.init(&format!("b{i}"), &[c_out], 0.2, 0.0);
        let p = k / 2;
        self.node(
            "Conv",
            &[x, &w, &b],
            vec![
                attr_ints("kernel_shape", &[k, k]),
                attr_ints("pads", &[p, p, p, p]),
                attr_i("group", group),
            ],
        )
    }

    fn batch_norm(&mut self, x: &str, c: i64) -> String {
        let i = self.nodes.len();
        let s = self.init(&format!("bn_s{i}"), &[c], 0.3, 1.0);
        let b = self.init(&format!("bn_b{i}"), &[c], 0.3, 0.0);
        let m = self.init(&format!("bn_m{i}"), &[c], 0.3, 0.0);
        let v = self.init(&format!("bn_v{i}"), &[c], 0.2, 1.0);
        self.node("BatchNormalization", &[x, &s, &b, &m, &v], vec![])
    }

    fn model(self, input: (&str, &[i64]), output: &str) -> pb::ModelProto {
        use pb::tensor_shape_proto::{dimension::Value, Dimension};
        let vi = |name: &str, dims: &[i64]| pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                denotation: String::new(),
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: pb::tensor_proto::DataType::Float as i32,
                    shape: Some(pb::TensorShapeProto {
                        dim: dims
                            .iter()
                            .enumerate()
                            .map(|(k, &d)| Dimension {
                                denotation: String::new(),
                                value: Some(if k == 0 {
                                    Value::DimParam("batch".into())
                                } else {
                                    Value::DimValue(d)
                                }),
                            })
                            .collect(),
                    }),
                })),
            }),
            doc_string: String::new(),
        };
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            producer_name: "equicrypt-test".into(),
            graph: Some(pb::GraphProto {
                node: self.nodes,
                name: "tiny".into(),
                initializer: self.inits,
                input: vec![vi(input.0, input.1)],
                output: vec![pb::ValueInfoProto {
                    name: output.into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Conv → BN → ReLU → residual block → depthwise conv → concat of two branches → global
/// average pool → flatten → Gemm → softmax.
fn resnet_like(seed: u64) -> pb::ModelProto {
    let mut b = Builder::new(seed);
    let c1 = b.conv("x", 3, 8, 3, 1);
    let n1 = b.batch_norm(&c1, 8);
    let r1 = b.node("Relu", &[&n1], vec![]);
    let c2 = b.conv(&r1, 8, 8, 3, 1);
    let a2 = b.node("Add", &[&c2, &r1], vec![]);
    let r2 = b.node("Relu", &[&a2], vec![]);
    let dw = b.conv(&r2, 8, 8, 3, 8);
    let r3 = b.node("Relu", &[&dw], vec![]);
    let side = b.conv(&r2, 8, 4, 1, 1);
    let s = b.init("chan_scale", &[1, 4, 1, 1], 0.5, 1.0);
    let side = b.node("Mul", &[&side, &s], vec![]);
    let cat = b.node("Concat", &[&r3, &side], vec![attr_i("axis", 1)]);
    let mp = b.node(
        "MaxPool",
        &[&cat],
        vec![
            attr_ints("kernel_shape", &[2, 2]),
            attr_ints("strides", &[2, 2]),
        ],
    );
    let gap = b.node("GlobalAveragePool", &[&mp], vec![]);
    let fl = b.node("Flatten", &[&gap], vec![attr_i("axis", 1)]);
    let w = b.init("fc_w", &[5, 12], 0.5, 0.0);
    let bias = b.init("fc_b", &[5], 0.2, 0.0);
    let g = b.node("Gemm", &[&fl, &w, &bias], vec![attr_i("transB", 1)]);
    let out = b.node("Softmax", &[&g], vec![attr_i("axis", 1)]);
    b.model(("x", &[2, 3, 8, 8]), &out)
}

/// A LeNet-style head: the classifier reads the flattened feature map (channel × position),
/// through an NHWC transpose and a reshape.
fn lenet_like(seed: u64) -> pb::ModelProto {
    let mut b = Builder::new(seed);
    let c1 = b.conv("x", 1, 6, 3, 1);
    let t1 = b.node("Tanh", &[&c1], vec![]);
    let p1 = b.node(
        "AveragePool",
        &[&t1],
        vec![
            attr_ints("kernel_shape", &[2, 2]),
            attr_ints("strides", &[2, 2]),
        ],
    );
    let nhwc = b.node("Transpose", &[&p1], vec![attr_ints("perm", &[0, 2, 3, 1])]);
    let shift = b.init("nhwc_shift", &[6], 0.5, 0.0);
    let shifted = b.node("Sub", &[&nhwc, &shift], vec![]);
    let nchw = b.node(
        "Transpose",
        &[&shifted],
        vec![attr_ints("perm", &[0, 3, 1, 2])],
    );
    let shape = b.int_init("flat_shape", &[-1, 6 * 4 * 4]);
    let fl = b.node("Reshape", &[&nchw, &shape], vec![]);
    let w = b.init("fc1_w", &[96, 10], 0.3, 0.0);
    let m = b.node("MatMul", &[&fl, &w], vec![]);
    let bias = b.init("fc1_b", &[10], 0.2, 0.0);
    let a = b.node("Add", &[&m, &bias], vec![]);
    let r = b.node("Relu", &[&a], vec![]);
    let w2 = b.init("fc2_w", &[10, 7], 0.3, 0.0);
    let out = b.node("MatMul", &[&r, &w2], vec![]);
    b.model(("x", &[2, 1, 8, 8]), &out)
}

/// Attention with two heads: the hidden axis is split into (heads, head dim) by a reshape,
/// the heads meet in Q·Kᵀ and in the weights·V product, and merge back before the output
/// projection.
fn attention_like(seed: u64) -> pb::ModelProto {
    let mut b = Builder::new(seed);
    let w0 = b.init("w_in", &[6, 8], 0.5, 0.0);
    let h0 = b.node("MatMul", &["x", &w0], vec![]);
    let h = b.node("Relu", &[&h0], vec![]);
    let split_shape = b.int_init("heads", &[-1, 4, 2, 4]);
    let merge_shape = b.int_init("merged", &[-1, 4, 8]);
    let proj = |b: &mut Builder, name: &str, perm: &[i64]| {
        let w = b.init(&format!("w_{name}"), &[8, 8], 0.5, 0.0);
        let bias = b.init(&format!("b_{name}"), &[8], 0.2, 0.0);
        let m = b.node("MatMul", &[&h, &w], vec![]);
        let a = b.node("Add", &[&m, &bias], vec![]);
        let r = b.node("Reshape", &[&a, &split_shape], vec![]);
        b.node("Transpose", &[&r], vec![attr_ints("perm", perm)])
    };
    let q = proj(&mut b, "q", &[0, 2, 1, 3]);
    let k = proj(&mut b, "k", &[0, 2, 3, 1]);
    let v = proj(&mut b, "v", &[0, 2, 1, 3]);
    let scores = b.node("MatMul", &[&q, &k], vec![]);
    let weights = b.node("Softmax", &[&scores], vec![attr_i("axis", -1)]);
    let ctx = b.node("MatMul", &[&weights, &v], vec![]);
    let t = b.node("Transpose", &[&ctx], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let merged = b.node("Reshape", &[&t, &merge_shape], vec![]);
    let wo = b.init("w_o", &[8, 8], 0.5, 0.0);
    let o = b.node("MatMul", &[&merged, &wo], vec![]);
    let res = b.node("Add", &[&o, &h], vec![]);
    let pooled = b.node(
        "ReduceMean",
        &[&res],
        vec![attr_ints("axes", &[1]), attr_i("keepdims", 0)],
    );
    let wc = b.init("w_cls", &[8, 5], 0.5, 0.0);
    let out = b.node("MatMul", &[&pooled, &wc], vec![]);
    b.model(("x", &[2, 4, 6]), &out)
}

/// A dense predictor: one output channel, which no permutation hides, so the client runs the
/// last convolution itself (the head), and adds a statistic of the raw input it kept.
fn dense_head_like(seed: u64) -> pb::ModelProto {
    let mut b = Builder::new(seed);
    let c1 = b.conv("x", 3, 8, 3, 1);
    let r1 = b.node("Relu", &[&c1], vec![]);
    let c2 = b.conv(&r1, 8, 8, 3, 1);
    let r2 = b.node("Relu", &[&c2], vec![]);
    let c3 = b.conv(&r2, 8, 1, 1, 1);
    let mean = b.node("ReduceMean", &["x"], vec![attr_ints("axes", &[1])]);
    let sum = b.node("Add", &[&c3, &mean], vec![]);
    let out = b.node("Sigmoid", &[&sum], vec![]);
    b.model(("x", &[2, 3, 6, 6]), &out)
}

fn write(dir: &Path, name: &str, m: &pb::ModelProto) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    p
}

fn random_input(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.next_u32() as f32 / u32::MAX as f32)
        .collect();
    Tensor::from_shape(shape, &v).unwrap()
}

fn check_equivalent(model: pb::ModelProto, input_shape: &[usize], seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let plain = write(dir.path(), "plain.onnx", &model);
    let key = SecretKey::from_bytes([(seed % 251) as u8; 32]);
    let out = dir.path().join("enc");
    let report = encrypt_onnx(&key, &plain, &out).unwrap();
    assert!(report.permutations >= 2, "{report:?}");
    assert_eq!(report.cut.len(), 1, "one value crosses: {report:?}");
    let x = random_input(input_shape, seed ^ 0x5eed);
    let run = run_tract(&key, &plain, &out, &[x], 2).unwrap();
    let p = equicrypt_onnx::values::<f32>(&run.plain).unwrap();
    let d = equicrypt_onnx::values::<f32>(&run.decrypted).unwrap();
    assert_eq!(p.len(), d.len());
    let scale = p.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (a, b) in p.iter().zip(&d) {
        assert!((a - b).abs() <= 1e-5 * scale, "{a} vs {b}");
    }
    // The server's output is not the plaintext one: its classes are permuted, or it is a
    // permuted activation the client's head finishes.
    let mut server = equicrypt_onnx::Stem::load(&out.join("server.onnx")).unwrap();
    let raw = server.run(run.cut.clone()).unwrap().remove(0);
    assert_ne!(equicrypt_onnx::values::<f32>(&raw).unwrap(), p);
    assert_eq!(report.head_nodes > 0, out.join("head.onnx").exists());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    #[test]
    fn resnet_like_graphs_are_equivariant(seed in any::<u64>()) {
        check_equivalent(resnet_like(seed), &[3, 3, 8, 8], seed);
    }

    #[test]
    fn flattened_feature_maps_carry_the_channel_permutation(seed in any::<u64>()) {
        check_equivalent(lenet_like(seed), &[3, 1, 8, 8], seed);
    }

    #[test]
    fn attention_heads_factor_the_hidden_permutation(seed in any::<u64>()) {
        check_equivalent(attention_like(seed), &[3, 4, 6], seed);
    }

    #[test]
    fn a_single_channel_output_is_finished_by_the_client_head(seed in any::<u64>()) {
        check_equivalent(dense_head_like(seed), &[3, 3, 6, 6], seed);
    }
}

fn refused(model: pb::ModelProto) -> String {
    let dir = tempfile::tempdir().unwrap();
    let plain = write(dir.path(), "plain.onnx", &model);
    let out = dir.path().join("enc");
    let e: OnnxError = encrypt_onnx(&SecretKey::from_bytes([1; 32]), &plain, &out).unwrap_err();
    assert!(!out.exists(), "nothing is written on error");
    e.to_string()
}

#[test]
fn an_argmax_over_permuted_classes_is_refused_by_name() {
    let mut b = Builder::new(1);
    let c = b.conv("x", 3, 4, 3, 1);
    let r = b.node("Relu", &[&c], vec![]);
    let am = b.node("ArgMax", &[&r], vec![attr_i("axis", 1)]);
    let e = refused(b.model(("x", &[1, 3, 4, 4]), &am));
    assert!(
        e.contains("/ArgMax_2") && e.contains("index into a permuted axis"),
        "{e}"
    );
}

#[test]
fn gathering_permuted_channels_is_refused() {
    let mut b = Builder::new(2);
    let c = b.conv("x", 3, 4, 3, 1);
    let idx = b.int_init("idx", &[0]);
    let g = b.node("Gather", &[&c, &idx], vec![attr_i("axis", 1)]);
    let e = refused(b.model(("x", &[1, 3, 4, 4]), &g));
    assert!(
        e.contains("/Gather_1") && e.contains("permuted axis 1"),
        "{e}"
    );
}

#[test]
fn a_constant_shared_with_a_plain_reader_is_refused() {
    let mut b = Builder::new(3);
    let c = b.conv("x", 3, 4, 1, 1);
    let r = b.node("Relu", &[&c], vec![]);
    let shared = b.init("shared", &[1, 4, 1, 1], 1.0, 0.0);
    let a = b.node("Add", &[&r, &shared], vec![]);
    let pooled = b.node("GlobalAveragePool", &[&a], vec![]);
    // The raw input also reads it — only its first channel, broadcast: a plain reader.
    let sliced = b.node("ReduceMean", &[&shared], vec![attr_ints("axes", &[1])]);
    let plain_use = b.node("Mul", &["x", &sliced], vec![]);
    let gp = b.node("GlobalAveragePool", &[&plain_use], vec![]);
    let total = b.node("ReduceSum", &[&gp], vec![attr_ints("axes", &[1, 2, 3])]);
    let out = b.node("Mul", &[&pooled, &total], vec![]);
    let e = refused(b.model(("x", &[1, 3, 4, 4]), &out));
    assert!(e.contains("`shared`") && e.contains("/ReduceMean_4"), "{e}");
}

#[test]
fn a_corrupt_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.onnx");
    std::fs::write(&p, b"\x08\x07not a protobuf at all\xff\xff\xff").unwrap();
    let out = dir.path().join("enc");
    let e = encrypt_onnx(&SecretKey::from_bytes([1; 32]), &p, &out)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.onnx") && e.contains("not a valid ONNX model"),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn a_client_with_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plain = write(dir.path(), "plain.onnx", &resnet_like(9));
    let out = dir.path().join("enc");
    encrypt_onnx(&SecretKey::from_bytes([4; 32]), &plain, &out).unwrap();
    let e = equicrypt_onnx::OnnxClient::open(&out, &SecretKey::from_bytes([5; 32]))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("client.json") && e.contains("not with this key"),
        "{e}"
    );
}
