//! A Hugging Face checkpoint through `encrypt --model DIR` and stock transformers: the encrypted
//! directory loads with `AutoModelForCausalLM.from_pretrained` unchanged and answers as the
//! plaintext checkpoint (`verify --engine transformers`, PyTorch CPU in float32).
//!
//! Needs `models/smollm2-hf` (`equicrypt fetch-model smollm2-hf`) and the transformers
//! environment (`scripts/setup-hf.sh`); SKIP otherwise unless `EQUICRYPT_REQUIRE_MODELS=1` /
//! `EQUICRYPT_REQUIRE_TRANSFORMERS=1`.

mod support;

use std::process::Command;

use equicrypt_test_support::{heavy_lock, hf_python, smollm2, smollm2_hf};
use serde_json::Value;
use support::BIN;

#[test]
fn encrypted_checkpoint_answers_as_the_plain_one_in_transformers() {
    let test = "encrypted_checkpoint_answers_as_the_plain_one_in_transformers";
    let (Some(plain), Some(gguf)) = (smollm2_hf(test), smollm2(test)) else {
        return;
    };
    let Some(python) = hf_python(test) else {
        return;
    };
    let _heavy = heavy_lock();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.key");
    support::keygen(&key);
    let enc = dir.path().join("enc");
    support::run_ok(&[
        "encrypt".as_ref(),
        "--key".as_ref(),
        key.as_os_str(),
        "--model".as_ref(),
        plain.as_os_str(),
        "--out".as_ref(),
        enc.as_os_str(),
    ]);
    let text: String = include_str!("../data/eval.txt").chars().take(900).collect();
    let prompts: Vec<&str> = include_str!("../data/prompts.txt")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(3)
        .collect();
    std::fs::write(dir.path().join("text.txt"), &text).unwrap();
    std::fs::write(dir.path().join("prompts.txt"), prompts.join("\n")).unwrap();
    let report = dir.path().join("report.json");
    let out = Command::new(BIN)
        .arg("verify")
        .args(["--engine", "transformers", "--gen-tokens", "8"])
        .arg("--key")
        .arg(&key)
        .arg("--plain")
        .arg(&plain)
        .arg("--encrypted")
        .arg(&enc)
        .arg("--tokenizer")
        .arg(&gguf)
        .arg("--text")
        .arg(dir.path().join("text.txt"))
        .arg("--prompts")
        .arg(dir.path().join("prompts.txt"))
        .arg("--json")
        .arg(&report)
        .env("EQUICRYPT_HF_PYTHON", &python)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let l = &r["logits"];
    assert!(l["tokens"].as_u64().unwrap() > 150, "{r}");
    assert_eq!(l["top1_agreement"], 1.0, "{r}");
    assert!(l["max_abs_logit_diff"].as_f64().unwrap() < 1e-3, "{r}");
    assert!(l["mean_kl"].as_f64().unwrap() < 1e-8, "{r}");
    assert_eq!(r["generation"]["identical"], 3, "{r}");
    assert_eq!(
        r["promised"], "equal up to rounding (not bit-identical)",
        "{r}"
    );
}
