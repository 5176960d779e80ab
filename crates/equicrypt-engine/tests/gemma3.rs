//! Gemma 3 270M (Q4_K_M: F32, Q4_K, Q5_0, Q6_K, Q8_0) in our engine: plaintext greedy output
//! against llama.cpp's on a wide-margin prompt, and plain vs encrypted equivalence in every
//! lossless mode. The model is found through `EQUICRYPT_GEMMA3_GGUF` or at
//! `models/gemma3/` (`equicrypt fetch-model gemma3`); SKIP unless `EQUICRYPT_REQUIRE_MODELS=1`.

use equicrypt_core::{PermMode, SecretKey, VocabPermutation};
use equicrypt_engine::{generate, Engine, LlamaModel, SamplingParams};
use equicrypt_model::{encrypt_gguf, EncryptOptions};

/// `Llama(...).tokenize(b"1, 2, 3, 4, 5,", add_bos=True, special=True)`, llama-cpp-python 0.3.36.
const PROMPT: [u32; 15] = [
    2, 236770, 236764, 236743, 236778, 236764, 236743, 236800, 236764, 236743, 236812, 236764,
    236743, 236810, 236764,
];
/// llama.cpp's greedy continuation (" 6, 7, 8"); its top-2 margins are 2.9 to 5.7 logits.
const LLAMA_CPP_GREEDY: [u32; 8] = [
    236743, 236825, 236764, 236743, 236832, 236764, 236743, 236828,
];

#[test]
fn gemma3_greedy_matches_llama_cpp_and_encryption_is_exact() {
    let Some(path) = equicrypt_test_support::gemma3("gemma3_engine") else {
        return;
    };
    let _heavy = equicrypt_test_support::heavy_lock();
    let mut plain = LlamaModel::load(&path).unwrap();
    let c = plain.config().clone();
    assert_eq!(
        (
            c.n_layer,
            c.d_model,
            c.d_ff,
            c.n_head,
            c.n_kv_head,
            c.head_dim
        ),
        (18, 640, 2048, 4, 1, 256)
    );
    assert_eq!(c.vocab_size, 262144);
    let margin = equicrypt_test_support::greedy_margin(&mut plain, &PROMPT, 8, &[]);
    equicrypt_test_support::assert_margin(&margin, "Gemma 3 counting completion");
    plain.reset();
    let g = generate(
        &mut plain,
        &PROMPT,
        8,
        &SamplingParams::greedy(),
        &[],
        |_| true,
    )
    .unwrap();
    assert_eq!(g.tokens, LLAMA_CPP_GREEDY, "our engine vs llama.cpp");

    // Plain vs encrypted at every position: stock bit-identical, exact equal to rounding.
    let seq: Vec<u32> = PROMPT.iter().chain(&g.tokens).copied().collect();
    plain.reset();
    let want = plain.forward_all(&seq).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::from_bytes([7; 32]);
    let v = c.vocab_size;
    for mode in [PermMode::Stock, PermMode::Exact] {
        let out = dir.path().join(format!("{}.gguf", mode.as_str()));
        let opts = EncryptOptions {
            mode,
            ..Default::default()
        };
        encrypt_gguf(&key, &path, &out, &opts).unwrap();
        let vocab = VocabPermutation::derive(&key, v);
        let mut enc = LlamaModel::load(&out).unwrap();
        let got = enc.forward_all(&vocab.encrypt_ids(&seq).unwrap()).unwrap();
        let mut identical = 0;
        let mut max_diff = 0f32;
        for t in 0..seq.len() {
            let row = &got[t * v..(t + 1) * v];
            let same = (0..v).all(|p| {
                let e = row[vocab.encrypt_id(p as u32).unwrap() as usize];
                max_diff = max_diff.max((e - want[t * v + p]).abs());
                e.to_bits() == want[t * v + p].to_bits()
            });
            identical += usize::from(same);
        }
        println!(
            "{}: {identical}/{} positions bit-identical, max |Δ| {max_diff}",
            mode.as_str(),
            seq.len()
        );
        match mode {
            // Stock mode: bit-identical (the 4-groups never change a float operand).
            PermMode::Stock => {
                assert_eq!(identical, seq.len(), "{mode:?}: max |Δlogit| {max_diff}")
            }
            // Exact mode on K-quants: candle's K-quant dot products add partial sums across a
            // sub-block in float, so only equality to rounding is promised (measured here: 0).
            _ => assert!(max_diff < 1e-2, "{mode:?}: max |Δlogit| {max_diff}"),
        }
        std::fs::remove_file(&out).unwrap();
    }
}
