//! The real model end to end through the binary: encrypt SmolLM2, inspect it, and verify that our
//! engine gives bit-identical logits and identical greedy answers (on a shortened text and three
//! prompts, to keep CI fast; the README's full numbers come from `equicrypt verify` defaults).

mod support;

use support::run_ok as run;

#[test]
fn smollm2_encrypts_cleanly_and_is_bit_exact_in_our_engine() {
    let Some(plain) = support::smollm2("smollm2_encrypts_cleanly") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("k.key");
    let enc = d.path().join("enc.gguf");
    let os = |s: &str| std::ffi::OsString::from(s);
    run(&[&os("keygen"), &os("--out"), key.as_os_str()]);
    run(&[
        &os("encrypt"),
        &os("--key"),
        key.as_os_str(),
        &os("--model"),
        plain.as_os_str(),
        &os("--out"),
        enc.as_os_str(),
    ]);
    let shown = run(&[&os("inspect"), enc.as_os_str()]);
    assert!(shown.contains("leak check:    clean"), "{shown}");
    assert!(
        !shown.contains("HuggingFaceTB") && !shown.contains("im_start"),
        "{shown}"
    );

    let text = d.path().join("text.txt");
    let eval = include_str!("../data/eval.txt");
    std::fs::write(&text, &eval[..1200]).unwrap();
    let prompts = d.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "What is the capital of France?\nWhat is 17 times 23?\nWrite a haiku about the ocean.\n",
    )
    .unwrap();
    let json = d.path().join("v.json");
    run(&[
        &os("verify"),
        &os("--key"),
        key.as_os_str(),
        &os("--plain"),
        plain.as_os_str(),
        &os("--encrypted"),
        enc.as_os_str(),
        &os("--text"),
        text.as_os_str(),
        &os("--prompts"),
        prompts.as_os_str(),
        &os("--gen-tokens"),
        &os("16"),
        &os("--json"),
        json.as_os_str(),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let l = &v["logits"];
    let tokens = l["tokens"].as_u64().unwrap();
    assert!(tokens > 200, "{v}");
    assert_eq!(l["bit_identical_rows"].as_u64().unwrap(), tokens, "{v}");
    assert_eq!(l["max_abs_logit_diff"].as_f64().unwrap(), 0.0);
    assert_eq!(v["generation"]["identical"].as_u64().unwrap(), 3, "{v}");
    let ppl = l["perplexity_plain"].as_f64().unwrap();
    assert!(ppl > 2.0 && ppl < 100.0, "implausible perplexity {ppl}");
    assert!(
        !v["generation"]["sample_answer"]
            .as_str()
            .unwrap()
            .trim()
            .is_empty(),
        "{v}"
    );
}
