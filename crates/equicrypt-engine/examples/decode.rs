//! Rough decode speed: `cargo run --release -p equicrypt-engine --example decode -- MODEL.gguf [N]`.
//! Greedy-decodes N tokens (default 64) after a 5-token prompt and prints tokens/second.

use equicrypt_engine::{Engine, LlamaModel, Sampler, SamplingParams};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: decode MODEL.gguf [N]")?;
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let t = std::time::Instant::now();
    let mut m = LlamaModel::load(&path)?;
    println!("loaded in {:?}: {:?}", t.elapsed(), m.config());
    let prompt = [504u32, 3575, 282, 4649, 314];
    let t = std::time::Instant::now();
    let mut logits = m.forward(&prompt)?;
    println!("prefill {} tokens: {:?}", prompt.len(), t.elapsed());
    let mut s = Sampler::new(SamplingParams::greedy())?;
    let t = std::time::Instant::now();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let id = s.sample(&logits)?;
        out.push(id);
        logits = m.forward(&[id])?;
    }
    let dt = t.elapsed().as_secs_f64();
    println!("decoded {n} tokens in {dt:.3}s: {:.1} tok/s", n as f64 / dt);
    println!("ids: {out:?}");
    Ok(())
}
