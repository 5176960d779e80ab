//! The attack lab end to end on the real model: `equicrypt audit` with a small budget runs every
//! attack on SmolLM2, and the numbers land in report.json / report.md / the plot. The budgets are
//! small to keep CI fast; the README's and THREAT_MODEL.md's numbers come from the standard
//! budget.

mod support;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use support::run_ok as run;

/// The Brown corpus, or `None` (after printing SKIP) when it is absent and not required.
fn brown(test: &str) -> Option<PathBuf> {
    let p = equicrypt_test_support::workspace().join("models/corpora/brown");
    equicrypt_test_support::require_or_skip(
        test,
        p.join("cats.txt").exists(),
        &format!("corpus {}", p.display()),
        "EQUICRYPT_REQUIRE_MODELS",
        "run `equicrypt fetch-corpus brown`",
    )
    .map(|()| p)
}

fn row<'a>(report: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no row {id} in {report}"))
}

fn score(report: &serde_json::Value, id: &str, field: &str) -> f64 {
    row(report, id)["score"][field].as_f64().unwrap()
}

#[test]
fn quick_audit_of_smollm2_runs_every_attack_and_scores_it() {
    let (Some(plain), Some(corpus)) = (support::smollm2("quick_audit"), brown("quick_audit"))
    else {
        return;
    };
    let _guard = support::heavy_lock();
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("k.key");
    let enc = d.path().join("enc.gguf");
    support::keygen(&key);
    support::encrypt(&key, &plain, &enc);
    let out = d.path().join("audit");
    let os = OsString::from;
    let summary = run(&[
        &os("audit"),
        &os("--encrypted"),
        enc.as_os_str(),
        &os("--public"),
        plain.as_os_str(),
        &os("--key"),
        key.as_os_str(),
        &os("--corpus"),
        corpus.as_os_str(),
        &os("--out"),
        out.as_os_str(),
        &os("--budget"),
        &os("quick"),
        &os("--a2-targets"),
        &os("128"),
        &os("--a2-candidates"),
        &os("1024"),
        &os("--a3-seconds"),
        &os("15"),
        &os("--a4-tokens"),
        &os("1024"),
        &os("--traffic-tokens"),
        &os("20000"),
        &os("--sessions"),
        &os("4"),
    ]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    // A1: the public weights give the whole vocabulary away.
    assert!(score(&report, "A1", "vocab_recovered") > 0.99, "{report}");
    assert!(score(&report, "A1", "tokens_recovered") > 0.99, "{report}");
    // A1-R: a rotation of the hidden space does not stop Procrustes.
    assert!(score(&report, "A1-R", "vocab_recovered") > 0.9, "{report}");
    // A2: the frequent ids it had budget for are found by their output distributions.
    assert!(score(&report, "A2", "tokens_recovered") > 0.3, "{report}");
    assert!(score(&report, "A2", "precision") > 0.9, "{report}");
    // A3: hill-climbing beats frequency ranking alone on the traffic it attacks.
    let a3 = row(&report, "A3")["traffic_tokens_recovered"]
        .as_f64()
        .unwrap();
    let a3f = row(&report, "A3-freq")["traffic_tokens_recovered"]
        .as_f64()
        .unwrap();
    assert!(
        a3 > a3f && a3 > 0.2,
        "A3 {a3} vs frequency only {a3f}: {report}"
    );
    // A4 ran on a sampled corpus and produced a scored guess.
    assert!(
        row(&report, "A4")["score"]["guessed"].as_u64().unwrap() > 0,
        "{report}"
    );
    // Re-keying: A3 ran on one session's traffic, scored against that session's permutation, and
    // the server links sessions by their tables.
    assert!(
        row(&report, "A3/one-session")["score"]["guessed"]
            .as_u64()
            .unwrap()
            > 0
    );
    let link = report["facts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["what"].as_str().unwrap().starts_with("session linking"))
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(link.starts_with("99.") || link.starts_with("100"), "{link}");
    // Hidden special ids: the rows exist and are scored on plain text too.
    for id in ["A3/hidden-special", "A3/hidden-special/naive"] {
        assert!(
            score(&report, id, "text_tokens_recovered") >= 0.0,
            "{report}"
        );
    }
    let facts = report["facts"].to_string();
    assert!(facts.contains("session linking"), "{facts}");
    assert!(facts.contains("EOS from traffic alone"), "{facts}");
    for f in ["report.md", "recovery_by_rank.svg", "traffic.jsonl"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    assert!(summary.contains("A3"), "{summary}");

    // The simulated traffic log is a valid --traffic input.
    let out2 = d.path().join("audit2");
    run(&[
        &os("audit"),
        &os("--encrypted"),
        enc.as_os_str(),
        &os("--tokenizer"),
        plain.as_os_str(),
        &os("--traffic"),
        out.join("traffic.jsonl").as_os_str(),
        &os("--corpus"),
        corpus.as_os_str(),
        &os("--out"),
        out2.as_os_str(),
        &os("--only"),
        &os("a3"),
        &os("--a3-seconds"),
        &os("2"),
    ]);
    let r2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("report.json")).unwrap()).unwrap();
    // Without a key nothing is scored, but the attack ran.
    assert!(row(&r2, "A3")["score"].is_null(), "{r2}");
}

#[test]
fn audit_rejects_bad_traffic_and_missing_knowledge_with_one_line() {
    let Some(plain) = support::smollm2("audit_rejects") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("k.key");
    let enc = d.path().join("enc.gguf");
    support::keygen(&key);
    support::encrypt(&key, &plain, &enc);
    let bad = d.path().join("bad.jsonl");
    let fail = |args: &[&std::ffi::OsStr]| -> String {
        let o = Command::new(support::BIN).args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        err
    };
    let out = d.path().join("out");
    let os = OsString::from;
    for (content, needle) in [
        (
            "{\"prompt\": [1, 2, 99999999]}\n",
            "outside the model's vocabulary",
        ),
        ("not json\n", "line 1"),
        ("", "holds no ids"),
    ] {
        std::fs::write(&bad, content).unwrap();
        let err = fail(&[
            &os("audit"),
            &os("--encrypted"),
            enc.as_os_str(),
            &os("--tokenizer"),
            plain.as_os_str(),
            &os("--traffic"),
            bad.as_os_str(),
            &os("--out"),
            out.as_os_str(),
        ]);
        assert!(err.contains(needle), "{err}");
    }
    // Nothing but the encrypted file: no attack can run.
    let err = fail(&[
        &os("audit"),
        &os("--encrypted"),
        enc.as_os_str(),
        &os("--out"),
        out.as_os_str(),
    ]);
    assert!(err.contains("no attack could run"), "{err}");
    // A wrong key is refused before anything runs.
    let other = d.path().join("other.key");
    support::keygen(&other);
    let err = fail(&[
        &os("audit"),
        &os("--encrypted"),
        enc.as_os_str(),
        &os("--key"),
        other.as_os_str(),
        &os("--out"),
        out.as_os_str(),
    ]);
    assert!(err.contains("key"), "{err}");
    assert!(!out.join("report.json").exists());
}
