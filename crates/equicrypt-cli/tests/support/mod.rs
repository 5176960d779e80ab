//! Shared helpers of the blind-serving tests (`serving.rs`, `proxy.rs`): the real model, a key and
//! an encrypted model made with the built binary, child processes (`equicrypt serve`, `proxy`,
//! `chat`) that are killed when dropped, and a recording TCP relay. The model path, SKIP policy,
//! heavy-test lock, child guard and raw HTTP client come from `equicrypt-test-support`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use equicrypt_client::{ChatTemplate, CipherSession, GgufTokenizer};
use equicrypt_core::SecretKey;
use equicrypt_model::GgufFile;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `equicrypt` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_equicrypt");

/// A user-only chat prompt (SmolLM2's template then adds its default system message; its greedy
/// answer is a near-tie on some CPUs, so tests compare answers with a reference, never with a text).
pub const FRANCE: &str = "What is the capital of France? Answer in one sentence.";

// Not every test binary that includes this module uses all of them.
#[allow(unused_imports)]
pub use equicrypt_test_support::{heavy_lock, raw_http, smollm2, ChildGuard};

/// Runs the binary to completion; panics with its stderr on failure; returns stdout.
pub fn run_ok(args: &[&std::ffi::OsStr]) -> String {
    let o = Command::new(BIN)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("run equicrypt");
    assert!(
        o.status.success(),
        "equicrypt {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A key made by `equicrypt keygen`.
pub fn keygen(path: &Path) -> SecretKey {
    run_ok(&["keygen".as_ref(), "--out".as_ref(), path.as_os_str()]);
    read_key(path)
}

/// Reads a key file.
pub fn read_key(path: &Path) -> SecretKey {
    SecretKey::from_file_text(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The 64 secret hex digits of a key file.
pub fn key_hex(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let hex = text.lines().nth(1).unwrap().trim().to_ascii_lowercase();
    assert_eq!(hex.len(), 64, "unexpected key file layout");
    hex
}

/// `equicrypt encrypt --key KEY --model PLAIN --out OUT`; returns what it printed.
pub fn encrypt(key: &Path, plain: &Path, out: &Path) -> String {
    run_ok(&[
        "encrypt".as_ref(),
        "--key".as_ref(),
        key.as_os_str(),
        "--model".as_ref(),
        plain.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ])
}

/// `p` when it exists; SKIP (or fail with `EQUICRYPT_REQUIRE_MODELS=1`) with `hint` otherwise.
pub fn path_or_skip(test: &str, p: PathBuf, hint: &str) -> Option<PathBuf> {
    equicrypt_test_support::require_or_skip(
        test,
        p.exists(),
        &p.display().to_string(),
        "EQUICRYPT_REQUIRE_MODELS",
        hint,
    )
    .map(|()| p)
}

/// A temporary directory with a fresh key and the model encrypted with it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub plain: PathBuf,
    pub key_path: PathBuf,
    pub key: SecretKey,
    pub enc: PathBuf,
}

impl Fixture {
    pub fn new(plain: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("a.key");
        let key = keygen(&key_path);
        let enc = dir.path().join("enc.gguf");
        encrypt(&key_path, plain, &enc);
        Self {
            dir,
            plain: plain.to_path_buf(),
            key_path,
            key,
            enc,
        }
    }

    /// The client side: tokenizer + vocabulary permutation, and the chat template.
    pub fn client_side(&self) -> (CipherSession, ChatTemplate) {
        let f = GgufFile::open(&self.plain).unwrap();
        let tok = GgufTokenizer::from_content(&f.content).unwrap();
        let template = ChatTemplate::from_content(&f.content).unwrap();
        (CipherSession::from_key(tok, &self.key), template)
    }
}

/// Runs `equicrypt chat --key KEY --tokenizer TOKENIZER --server SERVER EXTRA…` with `input` on
/// stdin; asserts that it succeeds and returns its stdout and stderr.
pub fn run_chat(
    key: &Path,
    tokenizer: &Path,
    server: &str,
    extra: &[&str],
    input: &str,
) -> (String, String) {
    use std::io::Write as _;
    let mut child = Command::new(BIN)
        .arg("chat")
        .arg("--key")
        .arg(key)
        .arg("--tokenizer")
        .arg(tokenizer)
        .args(["--server", server])
        .args(extra)
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn equicrypt chat");
    child
        .stdin
        .take()
        .expect("chat stdin")
        .write_all(input.as_bytes())
        .expect("write chat input");
    let o = child.wait_with_output().expect("chat output");
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "chat failed: {err}\n{out}");
    (out, err)
}

/// A child process whose stdout and stderr are captured; killed (and reaped) when dropped, also
/// while a failed assertion unwinds.
pub struct Proc {
    pub name: String,
    pub child: ChildGuard,
    pub stdout: Arc<Mutex<Vec<u8>>>,
    pub stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn capture(r: impl Read + Send + 'static, buf: Arc<Mutex<Vec<u8>>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        while let Ok(n) = r.read_until(b'\n', &mut line) {
            if n == 0 {
                break;
            }
            buf.lock().unwrap().extend_from_slice(&line);
            line.clear();
        }
    })
}

impl Proc {
    /// Spawns `equicrypt ARGS` with captured output (RAYON_NUM_THREADS=1, no HTTP proxies).
    pub fn spawn(name: &str, args: &[&std::ffi::OsStr]) -> Self {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RAYON_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn equicrypt");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            capture(child.stdout.take().unwrap(), stdout.clone()),
            capture(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Self {
            name: name.to_string(),
            child: ChildGuard(child),
            stdout,
            stderr,
            readers,
        }
    }

    /// `equicrypt serve --model ENC --listen 127.0.0.1:0`, started and healthy.
    pub fn serve(enc: &Path) -> (Self, SocketAddr) {
        let mut p = Self::spawn(
            "serve",
            &[
                "serve".as_ref(),
                "--model".as_ref(),
                enc.as_os_str(),
                "--listen".as_ref(),
                "127.0.0.1:0".as_ref(),
            ],
        );
        let addr = p.wait_listening("listening on ");
        wait_health(&mut p, addr);
        (p, addr)
    }

    /// `equicrypt proxy --key K --tokenizer P --server URL --listen 127.0.0.1:0`, started and healthy.
    pub fn proxy(key: &Path, plain: &Path, server: SocketAddr) -> (Self, SocketAddr) {
        Self::proxy_to(key, plain, &format!("http://{server}"), &[])
    }

    /// Like [`Proc::proxy`] for the server at `url`, with `extra` arguments (`--backend vllm`).
    pub fn proxy_to(key: &Path, plain: &Path, url: &str, extra: &[&str]) -> (Self, SocketAddr) {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "proxy".as_ref(),
            "--key".as_ref(),
            key.as_os_str(),
            "--tokenizer".as_ref(),
            plain.as_os_str(),
            "--server".as_ref(),
            url.as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
        ];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        let mut p = Self::spawn("proxy", &args);
        let addr = p.wait_listening("proxy listening on http://");
        wait_health(&mut p, addr);
        (p, addr)
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits (≤ 120 s) for a stderr line `PREFIX ADDR ...` and returns ADDR.
    pub fn wait_listening(&mut self, prefix: &str) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let err = self.stderr_text();
            if let Some(addr) = err.lines().find_map(|l| {
                l.strip_prefix(prefix)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            }) {
                return addr;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before listening:\n{err}",
                    self.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not report its address within 120 s:\n{err}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM (graceful shutdown), then waits ≤ 20 s for the exit and the end of its output.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        status
    }
}

fn wait_health(p: &mut Proc, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = raw_http(addr, "GET", "/health", None) {
            return;
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("{} exited with {status}:\n{}", p.name, p.stderr_text());
        }
        assert!(
            Instant::now() < deadline,
            "{} at {addr} not healthy within 60 s:\n{}",
            p.name,
            p.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Both directions of every connection that went through a [`Relay`].
#[derive(Clone, Default)]
pub struct Recording {
    /// Client → server bytes.
    pub up: Arc<Mutex<Vec<u8>>>,
    /// Server → client bytes.
    pub down: Arc<Mutex<Vec<u8>>>,
}

impl Recording {
    pub fn up_text(&self) -> String {
        String::from_utf8_lossy(&self.up.lock().unwrap()).into_owned()
    }
    pub fn down_text(&self) -> String {
        String::from_utf8_lossy(&self.down.lock().unwrap()).into_owned()
    }
}

/// A TCP relay on loopback that forwards every connection to `upstream` and records the bytes.
pub struct Relay {
    pub addr: SocketAddr,
    pub rec: Recording,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts the relay on the current tokio runtime.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let rec = Recording::default();
        let r = rec.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let r = r.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let a = tokio::spawn(pump(ri, wo, r.up.clone()));
                    let b = tokio::spawn(pump(ro, wi, r.down.clone()));
                    let _ = tokio::join!(a, b);
                });
            }
        });
        Self { addr, rec, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rec: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                rec.lock().unwrap().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// Words of at least `min` ASCII letters in `text`, lower-cased, deduplicated.
pub fn words(text: &str, min: usize) -> Vec<String> {
    let mut v: Vec<String> = text
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| w.len() >= min)
        .map(str::to_ascii_lowercase)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// `[1,2,3]` as serde_json writes it.
pub fn json_ids(ids: &[u32]) -> String {
    serde_json::to_string(ids).unwrap()
}

/// Runs `equicrypt verify` as a short job (the first 900 characters of the built-in text, the
/// first 3 built-in prompts, 8 generated tokens) with `extra` arguments (`--engine …`, files) in
/// the temporary directory `dir`; panics unless it exits 0, and returns its stdout and the JSON
/// report.
pub fn verify_short_job(
    dir: &Path,
    extra: &[&std::ffi::OsStr],
    env: &[(&str, &std::ffi::OsStr)],
) -> (String, serde_json::Value) {
    let text: String = include_str!("../../data/eval.txt")
        .chars()
        .take(900)
        .collect();
    let prompts: Vec<&str> = include_str!("../../data/prompts.txt")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(3)
        .collect();
    std::fs::write(dir.join("text.txt"), &text).unwrap();
    std::fs::write(dir.join("prompts.txt"), prompts.join("\n")).unwrap();
    let report = dir.join("report.json");
    let out = Command::new(BIN)
        .arg("verify")
        .args(extra)
        .args(["--gen-tokens", "8"])
        .arg("--text")
        .arg(dir.join("text.txt"))
        .arg("--prompts")
        .arg(dir.join("prompts.txt"))
        .arg("--json")
        .arg(&report)
        .envs(env.iter().copied())
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "verify failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    (stdout, r)
}
