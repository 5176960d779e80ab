//! The `equicrypt` binary on bad input: one-line errors, non-zero exits, nothing half-written.

use std::path::Path;
use std::process::{Command, Output};

use candle_core::quantized::GgmlDType;
use equicrypt_model::synthetic::SyntheticLlama;

fn equicrypt(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_equicrypt"))
        .args(args)
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("run equicrypt")
}

/// Asserts failure with exactly one stderr line that starts with `error:` and contains `needle`.
fn fails_with(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("error:"), "{err}");
    assert!(lines[0].contains(needle), "'{needle}' not in: {err}");
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn keygen_writes_0600_and_never_overwrites() {
    let d = tempfile::tempdir().unwrap();
    let out = ok(&equicrypt(&["keygen", "--out", "k.key"], d.path()));
    assert!(out.contains("fingerprint"));
    let text = std::fs::read_to_string(d.path().join("k.key")).unwrap();
    assert!(
        !out.contains(text.lines().nth(1).unwrap()),
        "keygen printed the secret"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("k.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let before = std::fs::read(d.path().join("k.key")).unwrap();
    fails_with(
        &equicrypt(&["keygen", "--out", "k.key"], d.path()),
        "already exists",
    );
    assert_eq!(std::fs::read(d.path().join("k.key")).unwrap(), before);
    // Two keys differ.
    ok(&equicrypt(&["keygen", "--out", "k2.key"], d.path()));
    assert_ne!(std::fs::read(d.path().join("k2.key")).unwrap(), before);
}

#[test]
fn encrypt_inspect_and_bad_inputs() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut m = SyntheticLlama::tiny_f32(7);
    m.matrix_dtype = GgmlDType::Q4_1;
    m.write(&dir.join("plain.gguf")).unwrap();
    ok(&equicrypt(&["keygen", "--out", "a.key"], dir));
    ok(&equicrypt(&["keygen", "--out", "b.key"], dir));
    std::fs::write(dir.join("bad.key"), "equicrypt-key-v1\nxyz\n").unwrap();
    std::fs::write(dir.join("junk.gguf"), b"GGUF but not really").unwrap();
    let bytes = std::fs::read(dir.join("plain.gguf")).unwrap();
    std::fs::write(dir.join("trunc.gguf"), &bytes[..bytes.len() / 2]).unwrap();

    let enc = |key: &str, model: &str, out: &str| {
        equicrypt(
            &["encrypt", "--key", key, "--model", model, "--out", out],
            dir,
        )
    };
    fails_with(&enc("bad.key", "plain.gguf", "o.gguf"), "64 hex digits");
    fails_with(&enc("missing.key", "plain.gguf", "o.gguf"), "missing.key");
    fails_with(&enc("a.key", "junk.gguf", "o.gguf"), "not a valid GGUF");
    fails_with(&enc("a.key", "trunc.gguf", "o.gguf"), "truncated");
    fails_with(&enc("a.key", "plain.gguf", "nodir/o.gguf"), "nodir/o.gguf");
    fails_with(
        &equicrypt(
            &[
                "encrypt",
                "--key",
                "a.key",
                "--model",
                "plain.gguf",
                "--out",
                "o.gguf",
                "--mode",
                "rot",
            ],
            dir,
        ),
        "unknown encryption mode",
    );
    let before = files(dir);
    assert!(
        !before
            .iter()
            .any(|f| f.starts_with("o.gguf") || f.ends_with(".tmp")),
        "{before:?}"
    );

    let out = ok(&enc("a.key", "plain.gguf", "o.gguf"));
    assert!(out.contains("encrypted"), "{out}");
    fails_with(&enc("a.key", "plain.gguf", "o.gguf"), "already exists");
    fails_with(
        &enc("a.key", "o.gguf", "o2.gguf"),
        "already an encrypted model",
    );

    let shown = ok(&equicrypt(&["inspect", "o.gguf"], dir));
    assert!(shown.contains("leak check:    clean"), "{shown}");
    assert!(
        !shown.contains("synthetic"),
        "model identity leaked: {shown}"
    );
    let plain_shown = ok(&equicrypt(&["inspect", "plain.gguf"], dir));
    assert!(plain_shown.contains("encrypted:     no"));
    fails_with(
        &equicrypt(&["inspect", "junk.gguf"], dir),
        "not a valid GGUF",
    );

    // Generation with the wrong key or with the encrypted file as tokenizer is refused up front.
    let gen = |key: &str, model: &str, tok: &str| {
        equicrypt(
            &[
                "generate",
                "--key",
                key,
                "--model",
                model,
                "--tokenizer",
                tok,
                "--prompt",
                "hi",
                "--raw",
            ],
            dir,
        )
    };
    fails_with(&gen("b.key", "o.gguf", "plain.gguf"), "wrong key");
    fails_with(
        &gen("a.key", "plain.gguf", "plain.gguf"),
        "not an equicrypt-encrypted model",
    );
    fails_with(&gen("a.key", "o.gguf", "o.gguf"), "plaintext model");
}

#[test]
fn a_closed_stdout_ends_quietly_instead_of_panicking() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("m.gguf");
    SyntheticLlama::tiny_f32(3).write(&model).unwrap();
    // `inspect --json` prints many lines; the reader is closed before it writes them.
    let mut child = Command::new(env!("CARGO_BIN_EXE_equicrypt"))
        .args(["inspect", "--json"])
        .arg(&model)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        out.status.success() || out.status.code() == Some(141),
        "{:?}: {err}",
        out.status
    );
}
