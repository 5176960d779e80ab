//! Stock ONNX Runtime (PyPI `onnxruntime`, run by `scripts/ort_run.py` in the pinned Python
//! environment) as the independent runtime for encrypted ONNX models.

use std::path::{Path, PathBuf};
use std::process::Command;

use tract_onnx::prelude::*;

use crate::eval::file_stem;
use crate::OnnxError;

/// One ONNX Runtime process: `python script model --input NAME=FILE… --out OUT`.
pub struct OrtRunner {
    /// The Python interpreter (with onnxruntime).
    pub python: PathBuf,
    /// `scripts/ort_run.py`.
    pub script: PathBuf,
}

impl OrtRunner {
    /// Writes `inputs` as `.npy` files in `dir`, runs `model` on them and reads its first output.
    pub fn run(
        &self,
        model: &Path,
        names: &[String],
        inputs: &[Tensor],
        dir: &Path,
    ) -> Result<Tensor, OnnxError> {
        let mut cmd = Command::new(&self.python);
        cmd.arg(&self.script).arg(model);
        for (name, t) in names.iter().zip(inputs) {
            let path = dir.join(format!("{}.npy", file_stem(name)));
            crate::npy::write_f32(&path, t)?;
            cmd.arg("--input").arg(format!("{name}={}", path.display()));
        }
        let out = dir.join("ort_output.npy");
        cmd.arg("--out").arg(&out);
        let o = cmd.output().map_err(|e| OnnxError::Run {
            what: format!("{} (ONNX Runtime)", self.script.display()),
            reason: e.to_string(),
        })?;
        if !o.status.success() {
            return Err(OnnxError::Run {
                what: format!("{} on ONNX Runtime", model.display()),
                reason: String::from_utf8_lossy(&o.stderr)
                    .trim()
                    .lines()
                    .last()
                    .unwrap_or("failed")
                    .to_string(),
            });
        }
        crate::npy::read(&out)
    }

    /// Throughput of `model` on inputs already written by [`OrtRunner::run`] into `dir`:
    /// images per second over about `seconds`.
    pub fn bench(
        &self,
        model: &Path,
        names: &[String],
        dir: &Path,
        seconds: f64,
    ) -> Result<f64, OnnxError> {
        let mut cmd = Command::new(&self.python);
        cmd.arg(&self.script).arg(model);
        for name in names {
            let path = dir.join(format!("{}.npy", file_stem(name)));
            cmd.arg("--input").arg(format!("{name}={}", path.display()));
        }
        cmd.arg("--out")
            .arg(dir.join("bench_output.npy"))
            .arg("--bench")
            .arg(seconds.to_string());
        let o = cmd.output().map_err(|e| OnnxError::Run {
            what: self.script.display().to_string(),
            reason: e.to_string(),
        })?;
        let text = String::from_utf8_lossy(&o.stdout);
        let line = text.lines().rev().find(|l| l.contains("images_per_s"));
        let v: serde_json::Value =
            line.and_then(|l| serde_json::from_str(l).ok())
                .ok_or_else(|| OnnxError::Run {
                    what: format!("{} --bench", model.display()),
                    reason: String::from_utf8_lossy(&o.stderr)
                        .trim()
                        .lines()
                        .last()
                        .unwrap_or("no result")
                        .to_string(),
                })?;
        v["images_per_s"].as_f64().ok_or_else(|| OnnxError::Run {
            what: format!("{} --bench", model.display()),
            reason: "no images_per_s".into(),
        })
    }
}
