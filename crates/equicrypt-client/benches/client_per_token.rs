//! Client cost per token on the real SmolLM2 tokenizer: what the key holder pays for every token
//! that crosses the wire.
//!
//! * `decrypt_detok/stream`: decrypt one ciphertext id and detokenize it incrementally
//!   (`CipherSession::decrypt_stream(false).push(cid)`), over a realistic answer-sized id stream
//!   (a paragraph of English text with some non-ASCII characters), fresh decoder per stream.
//! * `encrypt_ids/prompt`: encrypt already-tokenized prompt ids (the per-token part of sending).
//! * `tokenize_encrypt/prompt`: tokenize + encrypt the paragraph (`encrypt_prompt`), for scale.
//!
//! Throughput is reported in elements = tokens; time per token = 1 / throughput.
//!
//! `cargo bench -p equicrypt-client --bench client_per_token`. Without the model file
//! (`models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, or `EQUICRYPT_SMOLLM2=PATH`) it prints
//! `SKIP` and exits successfully.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use equicrypt_client::{CipherSession, GgufTokenizer};
use equicrypt_core::SecretKey;
use equicrypt_model::GgufFile;

const PARAGRAPH: &str = "The lighthouse keeper climbed the spiral stairs every evening at dusk, \
counting the one hundred and twelve steps as his father had taught him. From the gallery he could \
see the whole bay: the fishing boats returning with their nets, the gulls circling above the \
harbour, and far to the west the dark line of the storm that the radio had promised for midnight. \
He trimmed the wick, polished the great Fresnel lens until it shone, and wrote in the log: \
« 18:42 — vent du sud-ouest, 25 nœuds; mer agitée. » Then he made tea, sat by the window, and \
waited for the first flash to sweep across the water. In 1897 the keeper's daughter had kept the \
light burning for three days alone; her portrait still hung by the door, next to a barometer that \
had not worked since the war. Answer: 3 × 7 = 21, and π ≈ 3.14159 — café, naïve, 東京, 🚢.";

fn model_path() -> PathBuf {
    std::env::var_os("EQUICRYPT_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
            ))
        })
}

fn session(path: &std::path::Path) -> CipherSession {
    let f = GgufFile::open(path).expect("open the SmolLM2 GGUF");
    let tok = GgufTokenizer::from_content(&f.content).expect("build the tokenizer");
    CipherSession::from_key(tok, &SecretKey::from_bytes([7; 32]))
}

fn benches(c: &mut Criterion, s: &CipherSession) {
    let plain_ids = s.tokenizer().encode(PARAGRAPH, false).expect("encode");
    let cipher_ids = s.encrypt_ids(&plain_ids).expect("encrypt");
    let n = cipher_ids.len();
    // The stream must round-trip, or the benchmark measures the wrong thing.
    let mut dec = s.decrypt_stream(false);
    let mut text = String::new();
    for &cid in &cipher_ids {
        text.push_str(&dec.push(cid).expect("decrypt"));
    }
    text.push_str(&dec.finish());
    assert_eq!(text, PARAGRAPH, "decrypt+detokenize must round-trip");
    eprintln!(
        "id stream: {n} tokens from {} bytes of text",
        PARAGRAPH.len()
    );

    let mut g = c.benchmark_group("decrypt_detok");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("stream", |b| {
        b.iter(|| {
            let mut dec = s.decrypt_stream(false);
            for &cid in &cipher_ids {
                black_box(dec.push(black_box(cid)).expect("decrypt"));
            }
            black_box(dec.finish())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("encrypt_ids");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("prompt", |b| {
        b.iter(|| black_box(s.encrypt_ids(black_box(&plain_ids)).expect("encrypt")))
    });
    g.finish();

    let mut g = c.benchmark_group("tokenize_encrypt");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("prompt", |b| {
        b.iter(|| {
            black_box(
                s.encrypt_prompt(black_box(PARAGRAPH), false)
                    .expect("encrypt_prompt"),
            )
        })
    });
    g.finish();
}

fn main() {
    let path = model_path();
    if !path.exists() {
        eprintln!(
            "SKIP client_per_token: {} not found (run `equicrypt fetch-model smollm2`)",
            path.display()
        );
        return;
    }
    let s = session(&path);
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
        .configure_from_args();
    benches(&mut c, &s);
    c.final_summary();
}
