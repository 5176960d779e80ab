//! Hugging Face checkpoint directories in and out (`encrypt_hf`) on tiny synthetic checkpoints:
//! the output follows the plan tensor by tensor with the input's names, dtypes and shard layout,
//! carries ciphertext special ids and no plaintext vocabulary or model name, and bad input is a
//! one-line error that leaves nothing behind. (transformers running the result: see
//! `crates/equicrypt-cli/tests/transformers.rs`.)

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use equicrypt_core::{ArchFamily, HfLlamaFamily, LlamaPlan, PermMode, SecretKey, VocabPermutation};
use equicrypt_model::hf::{encrypt_hf, HfCheckpoint};
use equicrypt_model::quant::transform_tensor;
use equicrypt_model::{
    EncryptOptions, ModelError, SafetensorsSink, SafetensorsSource, TensorInfo, TensorSink,
    TensorSource,
};
use serde_json::{json, Value};

const D: usize = 64;
const FF: usize = 128;
const HEADS: usize = 2;
const KV: usize = 1;
const VOCAB: usize = 40;
const LAYERS: usize = 2;

fn config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "_name_or_path": "secret-model-name",
        "hidden_size": D, "intermediate_size": FF, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "num_hidden_layers": LAYERS, "vocab_size": VOCAB,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000, "rope_type": "default"},
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": null,
    })
}

/// Tensor names and shapes of the tiny checkpoint (q/k/v biases when `bias`).
fn tensors(bias: bool) -> Vec<(String, Vec<usize>)> {
    let hd = D / HEADS;
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, D])];
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        t.push((p("input_layernorm.weight"), vec![D]));
        t.push((p("self_attn.q_proj.weight"), vec![HEADS * hd, D]));
        t.push((p("self_attn.k_proj.weight"), vec![KV * hd, D]));
        t.push((p("self_attn.v_proj.weight"), vec![KV * hd, D]));
        if bias {
            t.push((p("self_attn.q_proj.bias"), vec![HEADS * hd]));
            t.push((p("self_attn.k_proj.bias"), vec![KV * hd]));
            t.push((p("self_attn.v_proj.bias"), vec![KV * hd]));
        }
        t.push((p("self_attn.o_proj.weight"), vec![D, HEADS * hd]));
        t.push((p("post_attention_layernorm.weight"), vec![D]));
        t.push((p("mlp.gate_proj.weight"), vec![FF, D]));
        t.push((p("mlp.up_proj.weight"), vec![FF, D]));
        t.push((p("mlp.down_proj.weight"), vec![D, FF]));
    }
    t.push(("model.norm.weight".into(), vec![D]));
    t.push(("lm_head.weight".into(), vec![VOCAB, D]));
    t
}

fn data(n: usize, seed: usize, dtype: GgmlDType) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let v = (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0;
            match dtype {
                GgmlDType::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                GgmlDType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                _ => v.to_le_bytes().to_vec(),
            }
        })
        .collect()
}

/// Writes a checkpoint into `dir` with `shards` shards (an index when more than one).
fn write_checkpoint(dir: &Path, shards: usize, bias: bool, dtype: GgmlDType) {
    std::fs::create_dir_all(dir).unwrap();
    let all = tensors(bias);
    let per = all.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (k, chunk) in all.chunks(per).enumerate() {
        let name = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", k + 1)
        };
        let headers: Vec<TensorInfo> = chunk
            .iter()
            .map(|(n, dims)| TensorInfo {
                name: n.clone(),
                dtype,
                dims: dims.clone(),
                size: (dims.iter().product::<usize>() * dtype.type_size()) as u64,
            })
            .collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let mut sink = SafetensorsSink::create(&dir.join(&name), &meta, headers).unwrap();
        for (i, (n, dims)) in chunk.iter().enumerate() {
            sink.write_tensor(n, &data(dims.iter().product(), k * 100 + i, dtype))
                .unwrap();
            weight_map.insert(n.clone(), json!(name));
        }
        sink.finish().unwrap();
    }
    if shards > 1 {
        let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    std::fs::write(dir.join("config.json"), config().to_string()).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        json!({"bos_token_id": 1, "eos_token_id": [2, 3], "_name_or_path": "x"}).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        r#"{"model": {"vocab": {"plaintext": 5}}}"#,
    )
    .unwrap();
    std::fs::write(dir.join("chat_template.jinja"), "{{ plaintext template }}").unwrap();
}

fn json_file(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn encrypted_checkpoint_follows_the_plan_shard_by_shard() {
    for (shards, bias, dtype) in [
        (1, false, GgmlDType::BF16),
        (3, true, GgmlDType::F32),
        (2, false, GgmlDType::F16),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (plain, enc) = (dir.path().join("plain"), dir.path().join("enc"));
        write_checkpoint(&plain, shards, bias, dtype);
        let key = SecretKey::from_bytes([shards as u8; 32]);
        let r = encrypt_hf(&key, &plain, &enc, &EncryptOptions::default()).unwrap();
        assert_eq!(r.tensors, tensors(bias).len());

        let ck_plain = HfCheckpoint::open(&plain).unwrap();
        let ck_enc = HfCheckpoint::open(&enc).unwrap();
        assert_eq!(ck_plain.shards(), ck_enc.shards());
        let info = ck_enc.encrypted_info().unwrap();
        info.check_key(&key).unwrap();
        assert_eq!(info.mode, PermMode::Stock);
        let cfg = HfLlamaFamily.read_config(&ck_plain).unwrap();
        let plan = LlamaPlan::derive(&key, cfg, PermMode::Stock).unwrap();
        for s in ck_plain.shards() {
            let mut a = SafetensorsSource::open(&plain.join(s)).unwrap();
            let mut b = SafetensorsSource::open(&enc.join(s)).unwrap();
            let (ia, ib) = (a.tensor_infos(), b.tensor_infos());
            let key_of = |v: &[TensorInfo]| -> Vec<(String, GgmlDType, Vec<usize>, u64)> {
                v.iter()
                    .map(|t| (t.name.clone(), t.dtype, t.dims.clone(), t.size))
                    .collect()
            };
            assert_eq!(
                key_of(&ia),
                key_of(&ib),
                "names, dtypes, shapes and order are kept"
            );
            for t in ia {
                let tr = plan
                    .transform_for_role(HfLlamaFamily.role_of(&t.name).unwrap())
                    .unwrap();
                let cols = *t.dims.last().unwrap();
                let rows = t.dims.iter().rev().skip(1).product();
                let want = transform_tensor(
                    &a.read_tensor_bytes(&t.name).unwrap(),
                    t.dtype,
                    rows,
                    cols,
                    &tr,
                )
                .unwrap();
                assert_eq!(b.read_tensor_bytes(&t.name).unwrap(), want, "{}", t.name);
            }
        }
        if shards > 1 {
            assert_eq!(
                json_file(&plain.join("model.safetensors.index.json")),
                json_file(&enc.join("model.safetensors.index.json"))
            );
        }
        let vocab = VocabPermutation::derive(&key, VOCAB);
        let c = json_file(&enc.join("config.json"));
        assert_eq!(c["bos_token_id"], json!(vocab.encrypt_id(1).unwrap()));
        assert_eq!(
            c["eos_token_id"],
            json!([vocab.encrypt_id(2).unwrap(), vocab.encrypt_id(3).unwrap()])
        );
        assert!(c["pad_token_id"].is_null());
        let g = json_file(&enc.join("generation_config.json"));
        assert_eq!(g["eos_token_id"], c["eos_token_id"]);
        let everything: String = std::fs::read_dir(&enc)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        for leak in [
            "secret-model-name",
            "plaintext",
            "_name_or_path",
            "chat_template",
        ] {
            assert!(!everything.contains(leak), "{leak} leaked");
        }
        assert!(!enc.join("chat_template.jinja").exists());
        let tok = json_file(&enc.join("tokenizer.json"));
        assert_eq!(tok["model"]["vocab"]["<ct7>"], json!(7));
        // Only the two directories remain: no temporary directory is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        let again = encrypt_hf(
            &key,
            &enc,
            &dir.path().join("x"),
            &EncryptOptions::default(),
        );
        assert!(
            matches!(again, Err(ModelError::AlreadyEncrypted(_))),
            "{again:?}"
        );
    }
}

/// Each bad input: one error naming the problem, and nothing written next to the input.
#[test]
fn bad_checkpoints_are_refused_and_leave_nothing() {
    let key = SecretKey::from_bytes([9; 32]);
    type Breaker = fn(&Path);
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "missing shard",
            |d| std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap(),
            "missing shard 'model-00002-of-00002.safetensors'",
        ),
        (
            "index and shard disagree",
            |d| {
                let p = d.join("model.safetensors.index.json");
                let mut v = json_file(&p);
                v["weight_map"]["model.norm.weight"] = json!("model-00001-of-00002.safetensors");
                std::fs::write(p, v.to_string()).unwrap();
            },
            "model.norm.weight",
        ),
        (
            "missing config key",
            |d| {
                let mut v = json_file(&d.join("config.json"));
                v.as_object_mut().unwrap().remove("num_hidden_layers");
                std::fs::write(d.join("config.json"), v.to_string()).unwrap();
            },
            "num_hidden_layers",
        ),
        (
            "unknown architecture",
            |d| {
                let mut v = json_file(&d.join("config.json"));
                v["model_type"] = json!("mamba");
                std::fs::write(d.join("config.json"), v.to_string()).unwrap();
            },
            "mamba",
        ),
        (
            "shape disagrees with config",
            |d| {
                let mut v = json_file(&d.join("config.json"));
                v["num_attention_heads"] = json!(1);
                v["head_dim"] = json!(32);
                std::fs::write(d.join("config.json"), v.to_string()).unwrap();
            },
            "self_attn.q_proj.weight",
        ),
        (
            "vocab disagrees",
            |d| {
                let mut v = json_file(&d.join("config.json"));
                v["vocab_size"] = json!(41);
                std::fs::write(d.join("config.json"), v.to_string()).unwrap();
            },
            "vocab_size 41",
        ),
        (
            "config not JSON",
            |d| {
                std::fs::write(d.join("config.json"), "{ nope").unwrap();
            },
            "config.json",
        ),
        (
            "no weights",
            |d| {
                for e in std::fs::read_dir(d).unwrap() {
                    let p = e.unwrap().path();
                    if p.to_string_lossy().contains("safetensors") {
                        std::fs::remove_file(p).unwrap();
                    }
                }
            },
            "neither model.safetensors",
        ),
    ];
    for (what, breaker, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (plain, enc) = (dir.path().join("plain"), dir.path().join("enc"));
        write_checkpoint(&plain, 2, false, GgmlDType::F32);
        breaker(&plain);
        let e = encrypt_hf(&key, &plain, &enc, &EncryptOptions::default()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(needle), "{what}: {msg}");
        assert!(!msg.contains('\n'), "{what}: one line: {msg}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "{what}: something was written"
        );
    }
    // An existing output directory is refused, untouched.
    let dir = tempfile::tempdir().unwrap();
    let (plain, enc) = (dir.path().join("plain"), dir.path().join("enc"));
    write_checkpoint(&plain, 1, false, GgmlDType::F32);
    std::fs::create_dir(&enc).unwrap();
    std::fs::write(enc.join("keep"), "x").unwrap();
    let e = encrypt_hf(&key, &plain, &enc, &EncryptOptions::default()).unwrap_err();
    assert!(matches!(e, ModelError::OutputExists(_)), "{e}");
    assert_eq!(std::fs::read_to_string(enc.join("keep")).unwrap(), "x");
}
