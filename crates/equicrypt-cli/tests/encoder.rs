//! A sentence encoder (all-MiniLM-L6-v2, BERT, `fetch-model minilm`) through `encrypt --model
//! DIR` and stock sentence-transformers: the encrypted checkpoint loads unchanged, embeds
//! ciphertext token ids, and its embeddings are the plaintext ones with their coordinates
//! permuted by the key's hidden permutation σ. Since σ is orthogonal, retrieval over *encrypted*
//! embeddings ranks real sentences (the Brown corpus, `fetch-corpus brown`) exactly as over
//! plaintext ones. And, as for decoders, a server holding the public checkpoint reads the
//! vocabulary permutation off the word embedding (A1, sorted-row matching).
//!
//! Needs `models/minilm`, `models/corpora/brown` and the transformers environment with
//! sentence-transformers (`scripts/setup-hf.sh`); SKIP otherwise unless
//! `EQUICRYPT_REQUIRE_MODELS=1` / `EQUICRYPT_REQUIRE_TRANSFORMERS=1`.

mod support;

use std::process::Command;

use equicrypt_core::{BertConfig, BertPlan, VocabPermutation};
use equicrypt_model::hf::HfCheckpoint;
use equicrypt_model::safetensors::SafetensorsSource;
use equicrypt_model::source::TensorSource;
use equicrypt_test_support::{heavy_lock, hf_python, workspace};
use serde_json::{json, Value};
use support::path_or_skip;

/// Sentences taken from the corpus, and how many of them serve as queries.
const SENTENCES: usize = 48;
const QUERIES: usize = 8;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Corpus indices by decreasing similarity to `q`.
fn ranking(q: &[f32], corpus: &[Vec<f32>]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..corpus.len()).collect();
    idx.sort_by(|&a, &b| dot(q, &corpus[b]).total_cmp(&dot(q, &corpus[a])));
    idx
}

#[test]
fn encrypted_minilm_embeds_as_the_plain_one_in_sentence_transformers() {
    let test = "encrypted_minilm_embeds_as_the_plain_one_in_sentence_transformers";
    let ws = workspace();
    let Some(plain) = path_or_skip(
        test,
        ws.join("models/minilm/config.json"),
        "run `equicrypt fetch-model minilm`",
    ) else {
        return;
    };
    let plain = plain.parent().unwrap().to_path_buf();
    let Some(brown) = path_or_skip(
        test,
        ws.join("models/corpora/brown/cats.txt"),
        "run `equicrypt fetch-corpus brown`",
    ) else {
        return;
    };
    let Some(python) = hf_python(test) else {
        return;
    };
    let _heavy = heavy_lock();
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("k.key");
    let key = support::keygen(&key_path);
    let enc = dir.path().join("enc");
    support::encrypt(&key_path, &plain, &enc);
    // No plaintext vocabulary, model card or training-data list travels with the checkpoint.
    for leak in [
        "vocab.txt",
        "README.md",
        "data_config.json",
        "special_tokens_map.json",
    ] {
        assert!(!enc.join(leak).exists(), "{leak} was copied");
    }
    let cfg = std::fs::read_to_string(enc.join("config.json")).unwrap();
    assert!(
        !cfg.contains("MiniLM"),
        "config.json names the model: {cfg}"
    );

    // Real sentences: the first sentences of Brown paragraphs; queries are the first half of
    // some of them.
    let docs = equicrypt_audit::corpus::read_brown(brown.parent().unwrap()).unwrap();
    let sentences: Vec<String> = docs
        .iter()
        .flat_map(|d| d.paragraphs.iter())
        .map(|p| p.split(". ").next().unwrap_or(p).to_string())
        .filter(|s| s.split_whitespace().count() >= 8)
        .take(SENTENCES)
        .collect();
    assert_eq!(sentences.len(), SENTENCES);
    let queries: Vec<String> = sentences
        .iter()
        .step_by(SENTENCES / QUERIES)
        .map(|s| {
            let w: Vec<&str> = s.split_whitespace().collect();
            w[..w.len() / 2].join(" ")
        })
        .collect();
    let tok = tokenizers::Tokenizer::from_file(plain.join("tokenizer.json")).unwrap();
    let texts: Vec<&String> = sentences.iter().chain(&queries).collect();
    let plain_ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tok.encode(t.as_str(), true).unwrap().get_ids().to_vec())
        .collect();
    let ck = HfCheckpoint::open(&plain).unwrap();
    let config = BertConfig::read(&ck).unwrap();
    let vocab = VocabPermutation::derive(&key, config.vocab_size);
    let cipher_ids: Vec<Vec<u32>> = plain_ids
        .iter()
        .map(|ids| vocab.encrypt_ids(ids).unwrap())
        .collect();
    assert_ne!(plain_ids, cipher_ids);

    let input = dir.path().join("ids.json");
    let output = dir.path().join("emb.json");
    std::fs::write(
        &input,
        json!({"plain_ids": plain_ids, "cipher_ids": cipher_ids}).to_string(),
    )
    .unwrap();
    let o = Command::new(&python)
        .arg(ws.join("scripts/encoder_eval.py"))
        .arg("--plain")
        .arg(&plain)
        .arg("--encrypted")
        .arg(&enc)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "encoder_eval.py failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    assert_eq!(
        r["modules"],
        json!(["Transformer", "Pooling", "Normalize"]),
        "{}",
        r["modules"]
    );
    let vecs = |k: &str| -> Vec<Vec<f32>> {
        serde_json::from_value::<Vec<Vec<f32>>>(r[k].clone()).unwrap()
    };
    let (p, e) = (vecs("plain"), vecs("encrypted"));
    let plan = BertPlan::derive(&key, config).unwrap();
    let mut max_diff = 0f32;
    let mut min_cos = 1f32;
    for (pv, ev) in p.iter().zip(&e) {
        let dv = plan.decrypt_hidden(ev).unwrap();
        assert_ne!(ev, pv, "the encrypted embedding is the plaintext one");
        max_diff = pv
            .iter()
            .zip(&dv)
            .map(|(a, b)| (a - b).abs())
            .fold(max_diff, f32::max);
        min_cos = min_cos.min(dot(pv, &dv));
    }
    println!(
        "MiniLM, {} embeddings: max |Δ| {max_diff:.2e} after decryption, min cosine {min_cos:.7} ({})",
        p.len(),
        r["versions"]
    );
    assert!(max_diff < 1e-5, "max |Δ| {max_diff}");
    assert!(min_cos > 0.99999, "min cosine {min_cos}");

    // Retrieval on encrypted embeddings, never decrypted: the same ranking as on plaintext.
    let (pc, ec) = (&p[..SENTENCES], &e[..SENTENCES]);
    let mut top1 = 0;
    let mut identical = 0;
    for (k, (pq, eq)) in p[SENTENCES..].iter().zip(&e[SENTENCES..]).enumerate() {
        let (rp, re) = (ranking(pq, pc), ranking(eq, ec));
        // Scores agree to rounding: ranks may only swap between sentences whose plaintext
        // scores are that close.
        for (a, b) in rp.iter().zip(&re) {
            let gap = (dot(pq, &pc[*a]) - dot(pq, &pc[*b])).abs();
            assert!(
                a == b || gap < 1e-5,
                "query {k}: rankings differ ({rp:?} vs {re:?})"
            );
        }
        identical += usize::from(rp == re);
        if rp[0] == k * (SENTENCES / QUERIES) {
            top1 += 1;
        }
    }
    println!(
        "retrieval over encrypted embeddings: {identical}/{QUERIES} rankings of {SENTENCES} sentences identical; \
         {top1}/{QUERIES} queries find their own sentence first"
    );
    assert!(top1 >= QUERIES / 2, "the model finds too few: {top1}");

    // A1 against a server holding the public checkpoint: sorted-row matching of the word
    // embedding names the plaintext token of (almost) every ciphertext id, as for decoders.
    let word_embedding = |dir: &std::path::Path| -> Vec<f32> {
        let mut src = SafetensorsSource::open(&dir.join("model.safetensors")).unwrap();
        src.read_tensor_bytes("embeddings.word_embeddings.weight")
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let m = equicrypt_audit::weight_matching::match_rows(
        &word_embedding(&plain),
        &word_embedding(&enc),
        plan.config.d_model,
    )
    .unwrap();
    let correct = m
        .guess
        .iter()
        .enumerate()
        .filter(|(c, g)| **g == Some(vocab.decrypt_id(*c as u32).unwrap()))
        .count();
    let wrong = m.guess.iter().flatten().count() - correct;
    println!(
        "A1 on MiniLM's word embedding: {correct}/{} ciphertext ids named correctly, {wrong} wrongly, \
         {} ambiguous, in {:.2} s",
        m.guess.len(),
        m.ambiguous,
        m.seconds
    );
    assert_eq!(wrong, 0);
    assert!(
        correct * 10 > m.guess.len() * 9,
        "A1 named only {correct} ids: the encoder would hide more than the decoders"
    );
}
