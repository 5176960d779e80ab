//! Model and tool paths, and the SKIP policy.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The SmolLM2 GGUF relative to the workspace root.
pub const SMOLLM2_REL: &str = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// Whether the environment variable `name` is `1`.
pub fn flag(name: &str) -> bool {
    std::env::var(name).as_deref() == Ok("1")
}

/// `Some(())` when `present`; otherwise prints `SKIP {test}: {what} ({hint})` and returns `None`,
/// or panics when `$require_var` is `1`.
pub fn require_or_skip(
    test: &str,
    present: bool,
    what: &str,
    require_var: &str,
    hint: &str,
) -> Option<()> {
    if present {
        return Some(());
    }
    assert!(
        !flag(require_var),
        "{test}: {what} is required ({require_var}=1) but absent; {hint}"
    );
    println!("SKIP {test}: {what} not found ({hint})");
    None
}

/// `path` if it is a file; otherwise SKIP (or fail under `EQUICRYPT_REQUIRE_MODELS=1`).
pub fn model_or_skip(test: &str, path: PathBuf) -> Option<PathBuf> {
    require_or_skip(
        test,
        path.is_file(),
        &format!("model {}", path.display()),
        "EQUICRYPT_REQUIRE_MODELS",
        "run `equicrypt fetch-model smollm2`",
    )
    .map(|()| path)
}

/// The plaintext SmolLM2 GGUF (`$EQUICRYPT_SMOLLM2`, else [`SMOLLM2_REL`] in the workspace), or
/// `None` after printing SKIP when it is absent and `EQUICRYPT_REQUIRE_MODELS` is not `1`.
pub fn smollm2(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("EQUICRYPT_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(SMOLLM2_REL));
    model_or_skip(test, path)
}

/// The Gemma 3 270M Q4_K_M GGUF relative to the workspace root.
pub const GEMMA3_REL: &str = "models/gemma3/gemma-3-270m-q4_k_m.gguf";

/// The plaintext Gemma 3 270M GGUF (`$EQUICRYPT_GEMMA3_GGUF`, else [`GEMMA3_REL`]), or `None`
/// after printing SKIP when it is absent and `EQUICRYPT_REQUIRE_MODELS` is not `1`.
pub fn gemma3(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("EQUICRYPT_GEMMA3_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(GEMMA3_REL));
    require_or_skip(
        test,
        path.is_file(),
        &format!("model {}", path.display()),
        "EQUICRYPT_REQUIRE_MODELS",
        "run `equicrypt fetch-model gemma3`",
    )
    .map(|()| path)
}

/// SmolLM2 as a transformers checkpoint directory (`$EQUICRYPT_SMOLLM2_HF`, else
/// `models/smollm2-hf`, made by `equicrypt fetch-model smollm2-hf`); SKIP or fail
/// (`EQUICRYPT_REQUIRE_MODELS=1`) when absent.
pub fn smollm2_hf(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("EQUICRYPT_SMOLLM2_HF")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("models/smollm2-hf"));
    require_or_skip(
        test,
        dir.join("config.json").is_file(),
        &format!("checkpoint {}", dir.display()),
        "EQUICRYPT_REQUIRE_MODELS",
        "run `equicrypt fetch-model smollm2-hf`",
    )
    .map(|()| dir)
}

/// The transformers environment's python (`$EQUICRYPT_HF_PYTHON`, else
/// `${EQUICRYPT_CACHE_DIR:-/work/cache}/hf-venv/bin/python`) when it imports torch and
/// transformers; SKIP or fail (`EQUICRYPT_REQUIRE_TRANSFORMERS=1`) otherwise.
pub fn hf_python(test: &str) -> Option<PathBuf> {
    let py = venv_python("EQUICRYPT_HF_PYTHON", "hf-venv");
    let ok = python_runs(&py, "import torch, transformers");
    require_or_skip(
        test,
        ok,
        &format!("transformers environment {}", py.display()),
        "EQUICRYPT_REQUIRE_TRANSFORMERS",
        "run scripts/setup-hf.sh",
    )
    .map(|()| py)
}

/// `$VAR`, else `${EQUICRYPT_CACHE_DIR:-/work/cache}/VENV/bin/python`.
pub(crate) fn venv_python(var: &str, venv: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("EQUICRYPT_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/work/cache"))
            .join(venv)
            .join("bin/python")
    })
}

/// Whether `PYTHON -c CODE` runs and exits 0.
pub(crate) fn python_runs(python: &Path, code: &str) -> bool {
    Command::new(python)
        .args(["-c", code])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `python3 -c "import MODULE"` succeeds.
pub fn python_has_module(module: &str) -> bool {
    python_runs(Path::new("python3"), &format!("import {module}"))
}

/// Whether the Python binding `llama_cpp` (llama-cpp-python) imports; SKIP or fail
/// (`EQUICRYPT_REQUIRE_LLAMACPP=1`) otherwise.
pub fn llama_cpp_python(test: &str) -> bool {
    require_or_skip(
        test,
        python_has_module("llama_cpp"),
        "python3 module llama_cpp",
        "EQUICRYPT_REQUIRE_LLAMACPP",
        "scripts/build-llamacpp.sh builds it",
    )
    .is_some()
}

/// Whether the official `openai` Python package imports; SKIP or fail
/// (`EQUICRYPT_REQUIRE_OPENAI=1`) otherwise.
pub fn openai_python(test: &str) -> bool {
    require_or_skip(
        test,
        python_has_module("openai"),
        "python3 module openai",
        "EQUICRYPT_REQUIRE_OPENAI",
        "pip install openai",
    )
    .is_some()
}

/// The newest `DIR/llamacpp-*/server/bin/llama-server` under the cache directory
/// (`$EQUICRYPT_CACHE_DIR`, default `/work/cache`), by modification time.
fn newest_cached_llama_server() -> Option<PathBuf> {
    let cache = std::env::var_os("EQUICRYPT_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/cache"));
    std::fs::read_dir(&cache)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("llamacpp-"))
        .map(|e| e.path().join("server/bin/llama-server"))
        .filter(|p| p.is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// The llama-server binary: `$EQUICRYPT_LLAMA_SERVER`, else the newest
/// `${EQUICRYPT_CACHE_DIR:-/work/cache}/llamacpp-*/server/bin/llama-server`; `None` after SKIP
/// when absent, a failure when `EQUICRYPT_REQUIRE_LLAMA_SERVER=1`.
pub fn llama_server(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("EQUICRYPT_LLAMA_SERVER")
        .map(PathBuf::from)
        .or_else(newest_cached_llama_server);
    let shown = path.as_ref().map_or_else(
        || "llama-server (no $EQUICRYPT_LLAMA_SERVER, no llamacpp-*/server/bin/llama-server in the cache)".to_string(),
        |p| format!("llama-server {}", p.display()),
    );
    let present = path.as_ref().is_some_and(|p| p.is_file());
    require_or_skip(
        test,
        present,
        &shown,
        "EQUICRYPT_REQUIRE_LLAMA_SERVER",
        "scripts/build-llamacpp.sh builds it",
    )?;
    path
}
