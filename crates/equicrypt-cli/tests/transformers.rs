//! A Hugging Face checkpoint through `encrypt --model DIR` and stock transformers: the encrypted
//! directory loads with `AutoModelForCausalLM.from_pretrained` unchanged and answers as the
//! plaintext checkpoint (`verify --engine transformers`, PyTorch CPU in float32).
//!
//! Needs `models/smollm2-hf` (`equicrypt fetch-model smollm2-hf`) and the transformers
//! environment (`scripts/setup-hf.sh`); SKIP otherwise unless `EQUICRYPT_REQUIRE_MODELS=1` /
//! `EQUICRYPT_REQUIRE_TRANSFORMERS=1`.

mod support;

use equicrypt_test_support::{heavy_lock, hf_python, smollm2, smollm2_hf};

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
    support::encrypt(&key, &plain, &enc);
    let (stdout, r) = support::verify_short_job(
        dir.path(),
        &[
            "--engine".as_ref(),
            "transformers".as_ref(),
            "--key".as_ref(),
            key.as_os_str(),
            "--plain".as_ref(),
            plain.as_os_str(),
            "--encrypted".as_ref(),
            enc.as_os_str(),
            "--tokenizer".as_ref(),
            gguf.as_os_str(),
        ],
        &[("EQUICRYPT_HF_PYTHON", python.as_os_str())],
    );
    println!("{stdout}");
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
