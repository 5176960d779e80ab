//! Property tests of the equivariance rules on tiny random LLaMA models: encrypt with a random
//! key through the real pipeline, run both files in the engine, map the encrypted logits back
//! through the vocabulary permutation, and compare.

use candle_core::quantized::GgmlDType;
use equicrypt_core::{PermMode, SecretKey, VocabPermutation};
use equicrypt_engine::{Engine, LlamaModel};
use equicrypt_model::synthetic::{SyntheticLayout, SyntheticLlama, SyntheticShape};
use equicrypt_model::{encrypt_gguf, EncryptOptions};
use proptest::prelude::*;

/// Runs plain and encrypted models on `ids` and returns (plain logits, decrypted encrypted logits).
fn run_pair(
    model: &SyntheticLlama,
    key: &SecretKey,
    mode: PermMode,
    ids: &[u32],
) -> (Vec<f32>, Vec<f32>) {
    let dir = tempfile::tempdir().unwrap();
    let (p, e) = (dir.path().join("p.gguf"), dir.path().join("e.gguf"));
    model.write(&p).unwrap();
    let opts = EncryptOptions {
        mode,
        ..Default::default()
    };
    encrypt_gguf(key, &p, &e, &opts).unwrap();
    let perm = VocabPermutation::derive(key, model.shape.vocab);
    let mut plain = LlamaModel::load(&p).unwrap();
    let mut enc = LlamaModel::load(&e).unwrap();
    let a = plain.forward_all(ids).unwrap();
    let b = enc.forward_all(&perm.encrypt_ids(ids).unwrap()).unwrap();
    let v = model.shape.vocab;
    let mut dec = vec![0f32; b.len()];
    for (row_b, row_d) in b.chunks(v).zip(dec.chunks_mut(v)) {
        for (i, d) in row_d.iter_mut().enumerate() {
            *d = row_b[perm.encrypt_id(i as u32).unwrap() as usize];
        }
    }
    (a, dec)
}

fn shapes() -> impl Strategy<Value = SyntheticShape> {
    prop_oneof![
        Just(SyntheticShape {
            n_layers: 2,
            d_model: 64,
            d_ff: 128,
            n_head: 2,
            n_kv_head: 1,
            vocab: 96
        }),
        Just(SyntheticShape {
            n_layers: 2,
            d_model: 128,
            d_ff: 128,
            n_head: 4,
            n_kv_head: 2,
            vocab: 80
        }),
        Just(SyntheticShape {
            n_layers: 1,
            d_model: 128,
            d_ff: 256,
            n_head: 4,
            n_kv_head: 4,
            vocab: 64
        }),
    ]
}

fn layouts() -> impl Strategy<Value = SyntheticLayout> {
    proptest::sample::select(SyntheticLayout::ALL.to_vec())
}

fn k_quant_types() -> impl Strategy<Value = GgmlDType> {
    proptest::sample::select(vec![
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ])
}

/// Every input axis a multiple of 256, so every matrix can be a K-quant.
const K_SHAPE: SyntheticShape = SyntheticShape {
    n_layers: 2,
    d_model: 256,
    d_ff: 512,
    n_head: 2,
    n_kv_head: 1,
    vocab: 64,
};

fn quant_types() -> impl Strategy<Value = GgmlDType> {
    prop_oneof![
        Just(GgmlDType::Q4_0),
        Just(GgmlDType::Q4_1),
        Just(GgmlDType::Q5_0),
        Just(GgmlDType::Q5_1),
        Just(GgmlDType::Q8_0),
    ]
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// F32 models, either mode: decrypted logits equal plaintext logits within 1e-5 relative.
    #[test]
    fn f32_models_agree_within_1e5(
        shape in shapes(),
        key in any::<[u8; 32]>(),
        seed in any::<u64>(),
        full in any::<bool>(),
        untied in any::<bool>(),
        layout in layouts(),
        ids in proptest::collection::vec(0u32..64, 1..12),
    ) {
        let mut m = SyntheticLlama::tiny_f32(seed).with_layout(layout);
        m.shape = shape;
        m.untied_head = untied;
        let mode = if full { PermMode::Full } else { PermMode::Exact };
        let (a, b) = run_pair(&m, &SecretKey::from_bytes(key), mode, &ids);
        let err = max_rel_err(&a, &b);
        prop_assert!(err <= 1e-5, "relative error {err}");
    }

    /// Block-quantized models in exact and stock mode: decrypted logits are bit-identical.
    #[test]
    fn quantized_models_are_bit_exact_in_exact_and_stock_mode(
        shape in shapes(),
        key in any::<[u8; 32]>(),
        seed in any::<u64>(),
        matrix in quant_types(),
        embed in quant_types(),
        stock in any::<bool>(),
        layout in layouts(),
        ids in proptest::collection::vec(0u32..64, 1..12),
    ) {
        let m = SyntheticLlama { shape, layout, matrix_dtype: matrix, embed_dtype: embed, untied_head: seed % 2 == 0, seed };
        let mode = if stock { PermMode::Stock } else { PermMode::Exact };
        let (a, b) = run_pair(&m, &SecretKey::from_bytes(key), mode, &ids);
        let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        prop_assert!(same, "{matrix:?}/{embed:?}: max rel err {}", max_rel_err(&a, &b));
    }

    /// Block-quantized models in full mode (blocks and heads move): equal up to rounding.
    #[test]
    fn quantized_models_agree_closely_in_full_mode(
        shape in shapes(),
        key in any::<[u8; 32]>(),
        seed in any::<u64>(),
        matrix in quant_types(),
        ids in proptest::collection::vec(0u32..64, 1..12),
    ) {
        let m = SyntheticLlama { shape, layout: SyntheticLayout::Llama, matrix_dtype: matrix, embed_dtype: GgmlDType::Q8_0, untied_head: false, seed };
        let (a, b) = run_pair(&m, &SecretKey::from_bytes(key), PermMode::Full, &ids);
        let err = max_rel_err(&a, &b);
        prop_assert!(err <= 5e-2, "{matrix:?}: relative error {err}");
    }

    /// K-quant models (every matrix Q2_K … Q6_K, embedding Q8_0 or Q4_K), every layout: stock
    /// mode is bit-identical in our engine; exact mode equal to rounding (candle's K-quant dot
    /// products add 8-value partial sums across a sub-block in float).
    #[test]
    fn k_quant_models_are_bit_exact_in_stock_mode(
        key in any::<[u8; 32]>(),
        seed in any::<u64>(),
        matrix in k_quant_types(),
        embed_k in any::<bool>(),
        stock in proptest::bool::weighted(0.75),
        layout in layouts(),
        ids in proptest::collection::vec(0u32..64, 1..12),
    ) {
        let embed = if embed_k { GgmlDType::Q4K } else { GgmlDType::Q8_0 };
        let m = SyntheticLlama { shape: K_SHAPE, layout, matrix_dtype: matrix, embed_dtype: embed, untied_head: seed % 2 == 0, seed };
        let mode = if stock { PermMode::Stock } else { PermMode::Exact };
        let (a, b) = run_pair(&m, &SecretKey::from_bytes(key), mode, &ids);
        if stock {
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            prop_assert!(same, "{layout:?} {matrix:?}/{embed:?} {mode:?}: max rel err {}", max_rel_err(&a, &b));
        } else {
            let err = max_rel_err(&a, &b);
            prop_assert!(err <= 1e-4, "{layout:?} {matrix:?}/{embed:?} {mode:?}: max rel err {err}");
        }
    }
}

/// Full mode would move 32-blocks across K-quant super-blocks (lossy): refused before anything
/// is written, naming the tensor.
#[test]
fn full_mode_on_k_quants_is_refused_naming_the_tensor() {
    let m = SyntheticLlama {
        shape: K_SHAPE,
        layout: SyntheticLayout::Llama,
        matrix_dtype: GgmlDType::Q4K,
        embed_dtype: GgmlDType::Q8_0,
        untied_head: false,
        seed: 1,
    };
    let dir = tempfile::tempdir().unwrap();
    let (p, e) = (dir.path().join("p.gguf"), dir.path().join("e.gguf"));
    m.write(&p).unwrap();
    let opts = EncryptOptions {
        mode: PermMode::Full,
        ..Default::default()
    };
    let err = encrypt_gguf(&SecretKey::from_bytes([3; 32]), &p, &e, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Q4K") && err.contains("tensor 'blk.0."),
        "{err}"
    );
    assert!(!e.exists(), "nothing half-written");
}
