//! The ONNX side of `encrypt` and `verify`: argument handling and printing only (the work is
//! in `equicrypt-onnx`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use equicrypt_core::SecretKey;
use equicrypt_onnx::eval::{compare, read_inputs, run_tract, Fidelity};
use equicrypt_onnx::ort::OrtRunner;
use equicrypt_onnx::{encrypt_onnx, OnnxClient};
use serde::Serialize;

/// Whether a path names an ONNX model.
pub fn is_onnx(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// `encrypt --model IN.onnx --out DIR`.
pub fn encrypt(key: &SecretKey, model: &Path, out: &Path, force: bool) -> Result<()> {
    if out.exists()
        && !force
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{} exists and is not empty (use --force to replace its files)",
            out.display()
        );
    }
    let t = std::time::Instant::now();
    let r = encrypt_onnx(key, model, out)?;
    println!(
        "encrypted {} ({} nodes, {} tensors rewritten, {} secret permutations, largest {:?}) in {:.2} s -> {}",
        model.display(),
        r.nodes,
        r.rewritten_tensors,
        r.permutations,
        &r.permutation_sizes[..r.permutation_sizes.len().min(4)],
        t.elapsed().as_secs_f64(),
        out.display()
    );
    println!(
        "client stem: {} nodes, {:.1} M multiply-accumulates per input ({:.2} % of {:.1} M); sends {}",
        r.client_nodes,
        r.client_macs as f64 / 1e6,
        100.0 * r.client_macs as f64 / r.total_macs.max(1) as f64,
        r.total_macs as f64 / 1e6,
        r.cut.iter().map(|(n, s)| format!("`{n}` {s}")).collect::<Vec<_>>().join(", ")
    );
    if r.head_nodes > 0 {
        println!(
            "client head: {} nodes, {:.1} M multiply-accumulates per input; the server returns {}",
            r.head_nodes,
            r.head_macs as f64 / 1e6,
            r.returned
                .iter()
                .map(|(n, s)| format!("`{n}` {s}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (name, axes) in &r.outputs {
        println!("output `{name}`: permuted axes {axes:?} (the client decrypts them)");
    }
    Ok(())
}

/// What `verify` reports for an ONNX model.
#[derive(Serialize)]
pub struct OnnxVerifyReport {
    /// `tract` or `onnxruntime`.
    pub engine: String,
    /// Plain vs decrypted first output.
    pub fidelity: Fidelity,
    /// Client stem, milliseconds per input (tract).
    pub stem_ms_per_input: f64,
    /// Whole plaintext model, milliseconds per input (tract).
    pub plain_ms_per_input: f64,
    /// `--bench`: throughput on ONNX Runtime.
    pub throughput: Option<Throughput>,
}

/// Inputs per second on ONNX Runtime, medians of interleaved rounds.
#[derive(Serialize)]
pub struct Throughput {
    /// Rounds (plain, then server, each about `--bench` seconds).
    pub rounds: usize,
    /// The plaintext model.
    pub plain_per_s: f64,
    /// The whole encrypted model, unsplit (the cost of permuted weights alone).
    pub whole_per_s: f64,
    /// The encrypted server model (the stem already ran on the client).
    pub server_per_s: f64,
    /// The whole encrypted pipeline: the server model plus the stem (in tract) per input.
    pub pipeline_per_s: f64,
    /// `whole_per_s / plain_per_s`.
    pub whole_ratio: f64,
    /// `server_per_s / plain_per_s`.
    pub server_ratio: f64,
    /// `pipeline_per_s / plain_per_s`.
    pub pipeline_ratio: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The ONNX part of `verify`'s arguments.
pub struct OnnxVerifyArgs<'a> {
    /// The plaintext model.
    pub plain: &'a Path,
    /// The encrypted directory.
    pub encrypted: &'a Path,
    /// Directory of `<input name>.npy`.
    pub inputs: &'a Path,
    /// Class labels (`.npy`).
    pub labels: Option<&'a PathBuf>,
    /// `tract` or `onnxruntime`.
    pub engine: &'a str,
    /// Where to write the JSON report.
    pub json: Option<&'a PathBuf>,
    /// Seconds per benchmark round, if benchmarking.
    pub bench: Option<f64>,
}

/// Runs `verify` on an ONNX model.
pub fn verify(key: &SecretKey, a: &OnnxVerifyArgs<'_>) -> Result<()> {
    let OnnxVerifyArgs {
        plain,
        encrypted,
        inputs,
        labels,
        engine,
        json,
        bench,
    } = *a;
    if bench.is_some() && engine != "onnxruntime" {
        bail!("--bench measures ONNX Runtime: add --engine onnxruntime");
    }
    let client = OnnxClient::open(encrypted, key)?;
    let names = client.manifest.inputs.clone();
    let cut_names = client.manifest.cut.clone();
    drop(client);
    let x = read_inputs(inputs, &names)?;
    let labels = match labels {
        Some(p) => {
            let t = equicrypt_onnx::npy::read(p)?;
            let t = t.cast_to::<i64>().context("labels must be integers")?;
            Some(equicrypt_onnx::values::<i64>(&t)?)
        }
        None => None,
    };
    let run = run_tract(key, plain, encrypted, &x, 64)?;
    let n = run.plain.shape()[0].max(1) as f64;
    let mut throughput = None;
    let fidelity = match engine {
        "tract" => compare(&run.plain, &run.decrypted, labels.as_deref())?,
        "onnxruntime" => {
            let ort = OrtRunner {
                python: crate::fetch::hf_python(),
                script: PathBuf::from(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../scripts/ort_run.py"
                )),
            };
            let dir = tempfile::tempdir()?;
            let plain_files = OrtRunner::write_inputs(&names, &x, dir.path())?;
            let cut_files = OrtRunner::write_inputs(&cut_names, &run.cut, dir.path())?;
            let plain_out = ort.run(plain, &plain_files, None, dir.path())?;
            let mut client = OnnxClient::open(encrypted, key)?;
            let server_model = OnnxClient::server_model(encrypted);
            let mut answer = Vec::new();
            for name in client.server_outputs() {
                answer.push(ort.run(&server_model, &cut_files, Some(&name), dir.path())?);
            }
            let pending = equicrypt_onnx::client::Pending {
                kept: run.kept.clone(),
                raw: client.head_raw(&x),
                local: Default::default(),
            };
            let first = client.manifest.outputs[0].name.clone();
            let dec = client
                .finish(pending, answer)?
                .remove(&first)
                .with_context(|| format!("no output `{first}`"))?;
            if let Some(seconds) = bench {
                let whole = dir.path().join("whole.onnx");
                std::fs::write(
                    &whole,
                    equicrypt_onnx::encrypt::encrypt_onnx_whole(key, plain)?,
                )?;
                let (mut p, mut w, mut s) = (Vec::new(), Vec::new(), Vec::new());
                let rounds = 5;
                for _ in 0..rounds {
                    p.push(ort.bench(plain, &plain_files, seconds)?);
                    w.push(ort.bench(&whole, &plain_files, seconds)?);
                    s.push(ort.bench(&server_model, &cut_files, seconds)?);
                }
                let (plain_per_s, whole_per_s, server_per_s) = (median(p), median(w), median(s));
                let stem_s = run.stem_seconds / n;
                let pipeline_per_s = 1.0 / (1.0 / server_per_s + stem_s);
                throughput = Some(Throughput {
                    rounds,
                    plain_per_s,
                    whole_per_s,
                    server_per_s,
                    whole_ratio: whole_per_s / plain_per_s,
                    pipeline_per_s,
                    server_ratio: server_per_s / plain_per_s,
                    pipeline_ratio: pipeline_per_s / plain_per_s,
                });
            }
            compare(&plain_out, &dec, labels.as_deref())?
        }
        other => bail!("unknown engine `{other}` for ONNX models (tract, onnxruntime)"),
    };
    let report = OnnxVerifyReport {
        engine: engine.to_string(),
        fidelity,
        stem_ms_per_input: 1e3 * run.stem_seconds / n,
        plain_ms_per_input: 1e3 * run.plain_seconds / n,
        throughput,
    };
    let f = &report.fidelity;
    println!("engine {}: {} inputs", report.engine, f.inputs);
    println!(
        "max |plain - encrypted| {:.3e} (outputs up to {:.3e}), min cosine {:.7}",
        f.max_abs_diff, f.max_abs_plain, f.min_cosine
    );
    if let Some(t) = f.top1_agreement {
        println!("top-1 agreement {:.2} %", 100.0 * t);
    }
    if let (Some(p), Some(e)) = (f.accuracy_plain, f.accuracy_encrypted) {
        println!(
            "accuracy plain {:.2} %, encrypted {:.2} %",
            100.0 * p,
            100.0 * e
        );
    }
    println!(
        "client stem {:.3} ms per input (tract), whole plaintext model {:.3} ms (tract)",
        report.stem_ms_per_input, report.plain_ms_per_input
    );
    if let Some(t) = &report.throughput {
        println!(
            "ONNX Runtime, medians of {} interleaved rounds: plain {:.1} inputs/s; whole encrypted model {:.1} ({:.3}x); server model {:.1} ({:.3}x); server + client stem (tract) {:.1} ({:.3}x)",
            t.rounds, t.plain_per_s, t.whole_per_s, t.whole_ratio, t.server_per_s, t.server_ratio, t.pipeline_per_s, t.pipeline_ratio
        );
    }
    if let Some(j) = json {
        std::fs::write(j, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", j.display()))?;
    }
    Ok(())
}
