//! Real-model check against llama.cpp on `SmolLM2-135M-Instruct.Q4_1.gguf`, found through
//! `EQUICRYPT_SMOLLM2` or at `models/smollm2/` in the workspace. When the file is absent the test
//! prints a message and passes, unless `EQUICRYPT_REQUIRE_MODELS=1` (as in CI), where it fails.

use equicrypt_engine::{generate, Engine, LlamaModel, SamplingParams, StopReason};

/// `Llama(...).tokenize(b"The capital of France is", add_bos=False, special=True)` (llama-cpp-python 0.3.36).
const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];
/// llama.cpp greedy continuation (" Paris.\n\nThe United States has ...").
const LLAMA_CPP_GREEDY: [u32; 8] = [7042, 30, 198, 198, 504, 1797, 1918, 553];

#[test]
fn smollm2_greedy_matches_llama_cpp() {
    let Some(path) = equicrypt_test_support::smollm2("smollm2_greedy_matches_llama_cpp") else {
        return;
    };
    let mut m = LlamaModel::load(&path).unwrap();
    let c = m.config().clone();
    assert_eq!(
        (c.n_layer, c.d_model, c.d_ff, c.n_head, c.n_kv_head),
        (30, 576, 1536, 9, 3)
    );
    assert_eq!((c.vocab_size, c.rope_base), (49152, 100000.0));
    assert!(m.tied_head());

    // The first 3 greedy tokens are compared with llama.cpp's: their margins must be wide
    // enough not to flip between CPU kinds (measured 2.64, 1.07, 1.48).
    let mut m3 = equicrypt_test_support::greedy_margin(&mut m, &PROMPT, 3, &[]);
    m3.text = format!("{:?}", m3.tokens);
    equicrypt_test_support::assert_margin(&m3, "SmolLM2 completion vs llama.cpp");
    m.reset();
    let t0 = std::time::Instant::now();
    let g = generate(&mut m, &PROMPT, 8, &SamplingParams::greedy(), &[], |_| true).unwrap();
    println!(
        "generated {:?} in {:?} (llama.cpp: {:?})",
        g.tokens,
        t0.elapsed(),
        LLAMA_CPP_GREEDY
    );
    assert_eq!(g.stop, StopReason::MaxTokens);
    assert_eq!(g.tokens[..3], LLAMA_CPP_GREEDY[..3]);
    let agree = g
        .tokens
        .iter()
        .zip(&LLAMA_CPP_GREEDY)
        .take_while(|(a, b)| a == b)
        .count();
    println!("agrees with llama.cpp on the first {agree} tokens");

    // batched prefill + forward_all agree with incremental decode on the last position
    m.reset();
    let seq: Vec<u32> = PROMPT.iter().chain(&g.tokens).copied().collect();
    let all = m.forward_all(&seq).unwrap();
    m.reset();
    m.forward(&seq[..seq.len() - 1]).unwrap();
    let last = m.forward(&seq[seq.len() - 1..]).unwrap();
    let v = c.vocab_size;
    let diff = last
        .iter()
        .zip(&all[(seq.len() - 1) * v..])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-3, "prefill vs decode max diff {diff}");
}
