//! End-to-end tests on tiny random GGUF models built in memory.

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use equicrypt_engine::testing::{
    metadata, random_weights, to_gguf, write_gguf, TinyLlamaSpec, Weights,
};
use equicrypt_engine::{generate, Engine, EngineError, LlamaModel, SamplingParams, StopReason};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

fn tiny(spec: &TinyLlamaSpec) -> LlamaModel {
    LlamaModel::from_bytes(&to_gguf(spec, &random_weights(spec)).unwrap()).unwrap()
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (rng.next_u32() as usize % vocab) as u32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn loads_config() {
    let m = tiny(&TinyLlamaSpec::default());
    let c = m.config();
    assert_eq!(
        (
            c.n_layer,
            c.d_model,
            c.d_ff,
            c.n_head,
            c.n_kv_head,
            c.head_dim
        ),
        (2, 64, 128, 4, 2, 16)
    );
    assert_eq!((c.vocab_size, c.context_length), (50, 64));
    assert!(m.tied_head());
    let untied = tiny(&TinyLlamaSpec {
        tied: false,
        ..Default::default()
    });
    assert!(!untied.tied_head());
}

#[test]
fn kv_cache_decode_matches_full_forward() {
    for spec in [
        TinyLlamaSpec::default(),
        TinyLlamaSpec {
            tied: false,
            seed: 3,
            ..Default::default()
        },
    ] {
        let mut m = tiny(&spec);
        let toks = tokens(20, spec.vocab_size, 1);
        let full = m.forward_all(&toks).unwrap();
        assert_eq!(full.len(), 20 * 50);
        assert_eq!(m.position(), 20);

        // one token at a time
        m.reset();
        assert_eq!(m.position(), 0);
        let mut worst = 0f32;
        let mut exact = true;
        for (t, &tok) in toks.iter().enumerate() {
            let l = m.forward(&[tok]).unwrap();
            let row = &full[t * 50..(t + 1) * 50];
            worst = worst.max(max_abs_diff(&l, row));
            exact &= l.iter().zip(row).all(|(a, b)| a.to_bits() == b.to_bits());
        }
        assert!(worst < 1e-4, "max diff {worst}");
        // rows are computed independently in candle's quantized matmul: expect bit-exactness
        assert!(exact, "incremental decode not bit-exact (max diff {worst})");

        // prefill 13 then decode the rest; last-position logits
        m.reset();
        let l = m.forward(&toks[..13]).unwrap();
        assert_eq!(l, full[12 * 50..13 * 50].to_vec());
        let l = m.forward(&toks[13..]).unwrap();
        assert_eq!(l, full[19 * 50..].to_vec());

        // chunked evaluation
        m.reset();
        let mut got = vec![0f32; full.len()];
        m.forward_chunked(&toks, 7, &mut |i, row| {
            got[i * 50..(i + 1) * 50].copy_from_slice(row)
        })
        .unwrap();
        assert_eq!(got, full);
    }
}

#[test]
fn errors_not_panics() {
    let spec = TinyLlamaSpec::default();
    let mut m = tiny(&spec);
    assert!(matches!(m.forward(&[]), Err(EngineError::EmptyInput)));
    match m.forward(&[1, 50]) {
        Err(EngineError::TokenOutOfRange {
            token: 50,
            vocab_size: 50,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(m.position(), 0);
    m.forward(&tokens(60, 50, 2)).unwrap();
    match m.forward(&tokens(5, 50, 3)) {
        Err(EngineError::ContextOverflow {
            requested: 65,
            context_length: 64,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(m.position(), 60);
    m.forward(&tokens(4, 50, 3)).unwrap();
    assert!(matches!(
        m.forward(&[0]),
        Err(EngineError::ContextOverflow { .. })
    ));
    assert!(m.set_context_length(10).is_err());
    m.reset();
    m.set_context_length(10).unwrap();
    assert!(matches!(
        m.forward_all(&tokens(11, 50, 4)),
        Err(EngineError::ContextOverflow { .. })
    ));
}

#[test]
fn load_errors() {
    let spec = TinyLlamaSpec::default();
    let w = random_weights(&spec);
    type Edit<'a> = &'a dyn Fn(&mut Vec<(String, Value)>);
    let with_meta = |f: Edit| {
        let mut md = metadata(&spec);
        f(&mut md);
        LlamaModel::from_bytes(&write_gguf(&spec, &md, &w).unwrap())
    };
    match with_meta(&|md| md[0].1 = Value::String("gpt2".into())) {
        Err(e @ EngineError::UnsupportedArchitecture { .. }) => {
            assert!(e.to_string().contains("gpt2"))
        }
        other => panic!("{other:?}"),
    }
    match with_meta(&|md| md.retain(|(k, _)| k != "llama.block_count")) {
        Err(EngineError::MissingMetadata { key }) => assert_eq!(key, "llama.block_count"),
        other => panic!("{other:?}"),
    }
    match with_meta(&|md| md[1].1 = Value::String("x".into())) {
        Err(EngineError::InvalidMetadata { .. }) => {}
        other => panic!("{other:?}"),
    }
    match with_meta(&|md| md[4].1 = Value::U32(5)) {
        Err(EngineError::InvalidConfig(_)) => {}
        other => panic!("{other:?}"),
    }
    // rope base defaults to 10000 when absent
    let m = with_meta(&|md| md.retain(|(k, _)| k != "llama.rope.freq_base")).unwrap();
    assert_eq!(m.config().rope_base, 10000.0);
    // missing tensor
    let mut w2 = w.clone();
    w2.remove("blk.1.ffn_up.weight");
    match LlamaModel::from_bytes(&to_gguf(&spec, &w2).unwrap()) {
        Err(EngineError::MissingTensor { name }) => assert_eq!(name, "blk.1.ffn_up.weight"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        LlamaModel::from_bytes(b"not a gguf"),
        Err(EngineError::Candle(_))
    ));
    assert!(matches!(
        LlamaModel::load("/nonexistent/model.gguf"),
        Err(EngineError::Io(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Equivariance: an "encrypted" copy (block-internal hidden/FF permutations, per-head V/O
// permutations, RoPE-pair sign flips on Q/K, vocabulary permutation) must give bit-identical logits.

fn shuffle(n: usize, rng: &mut ChaCha20Rng) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

/// A permutation of 0..n that maps each aligned group of `g` to itself.
fn grouped_shuffle(n: usize, g: usize, rng: &mut ChaCha20Rng) -> Vec<usize> {
    let mut p = Vec::with_capacity(n);
    for base in (0..n).step_by(g) {
        p.extend(shuffle(g, rng).into_iter().map(|i| base + i));
    }
    p
}

/// new[perm[r]] = old[r] along rows.
fn permute_rows((shape, data): &(Vec<usize>, Vec<f32>), perm: &[usize]) -> (Vec<usize>, Vec<f32>) {
    let cols = if shape.len() == 2 { shape[1] } else { 1 };
    let mut out = vec![0f32; data.len()];
    for (r, &pr) in perm.iter().enumerate() {
        out[pr * cols..(pr + 1) * cols].copy_from_slice(&data[r * cols..(r + 1) * cols]);
    }
    (shape.clone(), out)
}

/// new[:, perm[c]] = old[:, c].
fn permute_cols((shape, data): &(Vec<usize>, Vec<f32>), perm: &[usize]) -> (Vec<usize>, Vec<f32>) {
    let cols = shape[1];
    let mut out = vec![0f32; data.len()];
    for (row_in, row_out) in data.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        for (c, &pc) in perm.iter().enumerate() {
            row_out[pc] = row_in[c];
        }
    }
    (shape.clone(), out)
}

fn negate_rows((shape, data): &(Vec<usize>, Vec<f32>), flip: &[bool]) -> (Vec<usize>, Vec<f32>) {
    let cols = shape[1];
    let mut out = data.clone();
    for (row, &f) in out.chunks_exact_mut(cols).zip(flip) {
        if f {
            row.iter_mut().for_each(|x| *x = -*x);
        }
    }
    (shape.clone(), out)
}

struct Secret {
    vocab: Vec<usize>,
}

fn encrypt(spec: &TinyLlamaSpec, w: &Weights, seed: u64) -> (Weights, Secret) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let d = spec.d_model;
    let hd = d / spec.n_head;
    let group = spec.n_head / spec.n_kv_head;
    let pd = grouped_shuffle(d, 32, &mut rng);
    let pv = shuffle(spec.vocab_size, &mut rng);
    let mut e = Weights::new();
    let take = |n: &str| w.get(n).unwrap();
    e.insert(
        "token_embd.weight".into(),
        permute_cols(&permute_rows(take("token_embd.weight"), &pv), &pd),
    );
    if !spec.tied {
        e.insert(
            "output.weight".into(),
            permute_cols(&permute_rows(take("output.weight"), &pv), &pd),
        );
    }
    e.insert(
        "output_norm.weight".into(),
        permute_rows(take("output_norm.weight"), &pd),
    );
    for l in 0..spec.n_layer {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        let pf = grouped_shuffle(spec.d_ff, 32, &mut rng);
        // per kv head: a permutation of its head dims (V rows / O cols) and RoPE pair sign flips
        let mut pvh = Vec::new();
        let mut flips_kv = Vec::new();
        for g in 0..spec.n_kv_head {
            pvh.extend(shuffle(hd, &mut rng).into_iter().map(|i| g * hd + i));
            for _ in 0..hd / 2 {
                let f = rng.next_u32() & 1 == 1;
                flips_kv.extend([f, f]);
            }
        }
        let mut po = Vec::new();
        let mut flips_q = Vec::new();
        for h in 0..spec.n_head {
            let g = h / group;
            po.extend(
                pvh[g * hd..(g + 1) * hd]
                    .iter()
                    .map(|&j| h * hd + (j - g * hd)),
            );
            flips_q.extend_from_slice(&flips_kv[g * hd..(g + 1) * hd]);
        }
        e.insert(n("attn_norm"), permute_rows(take(&n("attn_norm")), &pd));
        e.insert(n("ffn_norm"), permute_rows(take(&n("ffn_norm")), &pd));
        e.insert(
            n("attn_q"),
            negate_rows(&permute_cols(take(&n("attn_q")), &pd), &flips_q),
        );
        e.insert(
            n("attn_k"),
            negate_rows(&permute_cols(take(&n("attn_k")), &pd), &flips_kv),
        );
        e.insert(
            n("attn_v"),
            permute_rows(&permute_cols(take(&n("attn_v")), &pd), &pvh),
        );
        e.insert(
            n("attn_output"),
            permute_cols(&permute_rows(take(&n("attn_output")), &pd), &po),
        );
        e.insert(
            n("ffn_gate"),
            permute_rows(&permute_cols(take(&n("ffn_gate")), &pd), &pf),
        );
        e.insert(
            n("ffn_up"),
            permute_rows(&permute_cols(take(&n("ffn_up")), &pd), &pf),
        );
        e.insert(
            n("ffn_down"),
            permute_cols(&permute_rows(take(&n("ffn_down")), &pd), &pf),
        );
    }
    assert_eq!(e.len(), w.len());
    (e, Secret { vocab: pv })
}

fn check_equivariance(spec: &TinyLlamaSpec, seed: u64) {
    let w = random_weights(spec);
    let (we, secret) = encrypt(spec, &w, seed);
    let mut plain = LlamaModel::from_bytes(&to_gguf(spec, &w).unwrap()).unwrap();
    let mut enc = LlamaModel::from_bytes(&to_gguf(spec, &we).unwrap()).unwrap();
    let v = spec.vocab_size;
    let toks = tokens(24, v, seed + 100);
    let etoks: Vec<u32> = toks
        .iter()
        .map(|&t| secret.vocab[t as usize] as u32)
        .collect();
    let a = plain.forward_all(&toks[..16]).unwrap();
    let b = enc.forward_all(&etoks[..16]).unwrap();
    let mut rows: Vec<(Vec<f32>, Vec<f32>)> = a
        .chunks_exact(v)
        .zip(b.chunks_exact(v))
        .map(|(x, y)| (x.to_vec(), y.to_vec()))
        .collect();
    for t in 16..24 {
        rows.push((
            plain.forward(&toks[t..t + 1]).unwrap(),
            enc.forward(&etoks[t..t + 1]).unwrap(),
        ));
    }
    for (t, (p, e)) in rows.iter().enumerate() {
        for i in 0..v {
            assert_eq!(
                e[secret.vocab[i]].to_bits(),
                p[i].to_bits(),
                "position {t} id {i}: plain {} encrypted {}",
                p[i],
                e[secret.vocab[i]]
            );
        }
    }
    // greedy generation commutes with the vocabulary permutation
    plain.reset();
    enc.reset();
    let gp = generate(
        &mut plain,
        &toks[..5],
        10,
        &SamplingParams::greedy(),
        &[],
        |_| true,
    )
    .unwrap();
    let ge = generate(
        &mut enc,
        &etoks[..5],
        10,
        &SamplingParams::greedy(),
        &[],
        |_| true,
    )
    .unwrap();
    let mapped: Vec<u32> = gp
        .tokens
        .iter()
        .map(|&t| secret.vocab[t as usize] as u32)
        .collect();
    assert_eq!(mapped, ge.tokens);
    // and so does seeded sampling
    plain.reset();
    enc.reset();
    let params = SamplingParams {
        temperature: 1.0,
        seed: seed ^ 0xabc,
        repeat_penalty: 1.1,
        ..Default::default()
    };
    let gp = generate(&mut plain, &toks[..5], 12, &params, &[], |_| true).unwrap();
    let ge = generate(&mut enc, &etoks[..5], 12, &params, &[], |_| true).unwrap();
    let mapped: Vec<u32> = gp
        .tokens
        .iter()
        .map(|&t| secret.vocab[t as usize] as u32)
        .collect();
    assert_eq!(mapped, ge.tokens);
}

#[test]
fn encrypted_model_logits_are_bit_identical() {
    // Q/K in Q8_0: negating a row is exact in Q8_0 (symmetric scale), not in Q4_1 (min offset).
    for (i, spec) in [
        TinyLlamaSpec {
            qk_dtype: GgmlDType::Q8_0,
            ..Default::default()
        },
        TinyLlamaSpec {
            qk_dtype: GgmlDType::Q8_0,
            tied: false,
            seed: 11,
            n_kv_head: 4,
            ..Default::default()
        },
        TinyLlamaSpec {
            qk_dtype: GgmlDType::Q8_0,
            matrix_dtype: GgmlDType::Q8_0,
            embd_dtype: GgmlDType::Q4_1,
            tied: false,
            seed: 5,
            ..Default::default()
        },
        TinyLlamaSpec {
            qk_dtype: GgmlDType::Q8_0,
            matrix_dtype: GgmlDType::Q4_0,
            seed: 6,
            ..Default::default()
        },
        TinyLlamaSpec {
            qk_dtype: GgmlDType::Q8_0,
            matrix_dtype: GgmlDType::Q5_1,
            seed: 8,
            ..Default::default()
        },
        TinyLlamaSpec {
            qk_dtype: GgmlDType::Q8_0,
            matrix_dtype: GgmlDType::Q5_0,
            seed: 9,
            ..Default::default()
        },
    ]
    .iter()
    .enumerate()
    {
        check_equivariance(spec, 1000 + i as u64);
    }
}

#[test]
fn generate_stops() {
    let spec = TinyLlamaSpec::default();
    let mut m = tiny(&spec);
    let prompt = tokens(4, 50, 9);
    let g = generate(&mut m, &prompt, 6, &SamplingParams::greedy(), &[], |_| true).unwrap();
    assert_eq!(g.stop, StopReason::MaxTokens);
    assert_eq!(g.tokens.len(), 6);
    assert_eq!(m.position(), 4 + 5);

    // stop on the 3rd greedy token
    m.reset();
    let stop = g.tokens[2];
    let first = g.tokens.iter().position(|&t| t == stop).unwrap();
    let g2 = generate(
        &mut m,
        &prompt,
        6,
        &SamplingParams::greedy(),
        &[stop],
        |_| true,
    )
    .unwrap();
    assert_eq!(g2.stop, StopReason::StopToken(stop));
    assert_eq!(g2.tokens, g.tokens[..first].to_vec());

    // callback stop
    m.reset();
    let mut seen = Vec::new();
    let g3 = generate(&mut m, &prompt, 6, &SamplingParams::greedy(), &[], |t| {
        seen.push(t);
        seen.len() < 2
    })
    .unwrap();
    assert_eq!(g3.stop, StopReason::Callback);
    assert_eq!(g3.tokens, g.tokens[..2].to_vec());
    assert_eq!(seen, g3.tokens);

    // context full
    m.reset();
    m.set_context_length(8).unwrap();
    let g4 = generate(&mut m, &prompt, 100, &SamplingParams::greedy(), &[], |_| {
        true
    })
    .unwrap();
    assert_eq!(g4.stop, StopReason::ContextFull);
    assert_eq!(g4.tokens.len(), 5);
    assert_eq!(m.position(), 8);

    assert!(matches!(
        generate(&mut m, &[], 3, &SamplingParams::greedy(), &[], |_| true),
        Err(EngineError::EmptyInput)
    ));
}
