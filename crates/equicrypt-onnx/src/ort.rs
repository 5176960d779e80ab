//! Stock ONNX Runtime (PyPI `onnxruntime`, run by `scripts/ort_run.py` in the pinned Python
//! environment) as the independent runtime for encrypted ONNX models.

use std::path::{Path, PathBuf};
use std::process::Command;

use tract_onnx::prelude::*;

use crate::eval::file_stem;
use crate::OnnxError;

/// Graph inputs written as `.npy` files: `(name, path)` pairs.
pub type InputFiles = Vec<(String, PathBuf)>;

/// One ONNX Runtime process per call: `python script model --input NAME=FILE… --out OUT`.
pub struct OrtRunner {
    /// The Python interpreter (with onnxruntime).
    pub python: PathBuf,
    /// `scripts/ort_run.py`.
    pub script: PathBuf,
}

impl OrtRunner {
    /// Writes `inputs` as `.npy` files in `dir` (named after the inputs, made file-safe).
    pub fn write_inputs(
        names: &[String],
        inputs: &[Tensor],
        dir: &Path,
    ) -> Result<InputFiles, OnnxError> {
        names
            .iter()
            .zip(inputs)
            .map(|(name, t)| {
                let path = dir.join(format!("{}.npy", file_stem(name)));
                crate::npy::write_f32(&path, t)?;
                Ok((name.clone(), path))
            })
            .collect()
    }

    fn command(&self, model: &Path, files: &InputFiles) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(&self.script).arg(model);
        for (name, path) in files {
            cmd.arg("--input").arg(format!("{name}={}", path.display()));
        }
        cmd
    }

    fn failed(&self, what: String, o: &std::process::Output) -> OnnxError {
        OnnxError::Run {
            what,
            reason: String::from_utf8_lossy(&o.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("failed")
                .to_string(),
        }
    }

    /// Runs `model` on the written inputs and reads output `output` (default: the first).
    pub fn run(
        &self,
        model: &Path,
        files: &InputFiles,
        output: Option<&str>,
        dir: &Path,
    ) -> Result<Tensor, OnnxError> {
        let out = dir.join("ort_output.npy");
        let mut cmd = self.command(model, files);
        cmd.arg("--out").arg(&out);
        if let Some(o) = output {
            cmd.arg("--output").arg(o);
        }
        let o = cmd.output().map_err(|e| OnnxError::Run {
            what: format!("{} (ONNX Runtime)", self.script.display()),
            reason: e.to_string(),
        })?;
        if !o.status.success() {
            return Err(self.failed(format!("{} on ONNX Runtime", model.display()), &o));
        }
        crate::npy::read(&out)
    }

    /// Throughput of `model` on the written inputs: inputs per second over about `seconds`.
    pub fn bench(&self, model: &Path, files: &InputFiles, seconds: f64) -> Result<f64, OnnxError> {
        let o = self
            .command(model, files)
            .arg("--bench")
            .arg(seconds.to_string())
            .output()
            .map_err(|e| OnnxError::Run {
                what: self.script.display().to_string(),
                reason: e.to_string(),
            })?;
        let text = String::from_utf8_lossy(&o.stdout);
        let v: Option<serde_json::Value> = text
            .lines()
            .rev()
            .find(|l| l.contains("images_per_s"))
            .and_then(|l| serde_json::from_str(l).ok());
        v.and_then(|v| v["images_per_s"].as_f64())
            .ok_or_else(|| self.failed(format!("{} --bench", model.display()), &o))
    }
}
