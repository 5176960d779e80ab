//! `equicrypt bench-serve`: what serving over HTTP costs, in one run with interleaved rounds.
//!
//! Three paths generate the same greedy answer to the same chat prompt on the encrypted model:
//!
//! * **direct**: the engine in this process, every id decrypted and detokenized as it comes
//!   (no HTTP);
//! * **server**: `equicrypt serve` as a child process, this process streaming through
//!   [`BlindChat`] (tokenize, encrypt, SSE, decrypt);
//! * **proxy**: `equicrypt proxy` and `equicrypt serve` as child processes, this process sending
//!   a plaintext OpenAI streaming chat completion to the proxy and reading its SSE answer.
//!
//! Decode throughput is measured on the client's clock from the first generated token to the last
//! one ((tokens after the first) ÷ time), so prompt processing and request setup are left out;
//! the end-to-end rate (all tokens ÷ time from sending the request to the end of the answer) is
//! reported too. Every path must produce the same text.
//!
//! A fourth reference, `equicrypt bench-decode` in a fresh process per round (engine only, what
//! `bench` measures), is reported beside the in-process direct run: the engine decodes at a
//! rate that depends on the process it runs in (memory placement: the README's `bench` notes
//! ~10 % between models loaded in one process), and the in-process run can land on the fast side.
//!
//! Run it as `RAYON_NUM_THREADS=1 equicrypt bench-serve ...`: the direct run uses this process's
//! thread setting and the server child gets the same value; the command refuses to run without it.
//! Children are killed when the command ends, also on errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use equicrypt_client::remote::{Backend, BlindChat, GenerateParams, RemoteClient, SseParser};
use equicrypt_engine::{generate, Engine, SamplingParams};
use serde::Serialize;

use crate::keyfile;
use crate::session::{load_encrypted, ClientSide};

/// The prompt every path answers (long enough an answer that greedy decoding rarely stops early).
const PROMPT: &str = "Tell me a long story about a lighthouse.";

/// Arguments of `bench-serve`.
#[derive(Args)]
pub struct BenchServeArgs {
    #[command(flatten)]
    pair: crate::session::ModelPair,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(2..=1024))]
    tokens: u64,
    /// Rounds (each runs the three paths, in rotating order).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=50))]
    rounds: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One timed generation.
#[derive(Clone, Debug)]
struct Run {
    text: String,
    tokens: usize,
    /// Tokens per second between the first and the last generated token.
    decode_tok_s: f64,
    /// All tokens ÷ (request start → end of the answer).
    e2e_tok_s: f64,
    /// The server's own `predicted_per_second` (server path only).
    server_clock_tok_s: Option<f64>,
}

impl Run {
    /// From the arrival times of each event and the tokens it carried.
    fn from_events(
        text: String,
        start: Instant,
        end: Instant,
        events: &[(Instant, usize)],
    ) -> Self {
        let tokens: usize = events.iter().map(|e| e.1).sum();
        let decode_tok_s = match (events.first(), events.last()) {
            (Some(f), Some(l)) if l.0 > f.0 => (tokens - f.1) as f64 / (l.0 - f.0).as_secs_f64(),
            _ => 0.0,
        };
        Self {
            text,
            tokens,
            decode_tok_s,
            e2e_tok_s: tokens as f64 / (end - start).as_secs_f64(),
            server_clock_tok_s: None,
        }
    }
}

/// A child process killed (and reaped) when dropped.
struct ChildGuard {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let f = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .with_context(|| format!("cannot start the {name} child process"))?;
        Ok(Self { name, child, log })
    }

    /// The last line the child wrote to stderr.
    fn last_log_line(&self) -> String {
        std::fs::read_to_string(&self.log)
            .ok()
            .and_then(|s| {
                s.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(str::to_string)
            })
            .unwrap_or_default()
    }

    /// Polls `GET /health` until it answers 200; fails early when the child exits.
    fn wait_healthy(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "the {} child exited ({st}) before it was ready: {}",
                    self.name,
                    self.last_log_line()
                );
            }
            if matches!(http_get_status(addr, "/health"), Ok(200)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the {} child did not become healthy within {} s: {}",
                    self.name,
                    timeout.as_secs(),
                    self.last_log_line()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot find a free loopback port")?;
    Ok(l.local_addr()?)
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Status code of `GET path` (HTTP/1.1, connection closed after).
fn http_get_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let mut s = connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut r = BufReader::new(s);
    let (status, _) = read_head(&mut r)?;
    Ok(status)
}

/// Reads the status line and headers; returns the status and whether the body is chunked.
fn read_head(r: &mut impl BufRead) -> Result<(u16, bool)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP status line {:?}", line.trim()))?;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        let l = line.to_ascii_lowercase();
        if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            chunked = true;
        }
    }
    Ok((status, chunked))
}

/// A minimal HTTP/1.1 body reader (chunked or read-to-close) that hands out byte pieces as they
/// arrive.
struct BodyReader<R> {
    r: R,
    chunked: bool,
    done: bool,
}

impl<R: BufRead> BodyReader<R> {
    /// The next piece of the body, or `None` at its end.
    fn next_piece(&mut self) -> Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        if !self.chunked {
            let mut buf = vec![0u8; 16 << 10];
            let k = self.r.read(&mut buf)?;
            if k == 0 {
                self.done = true;
                return Ok(None);
            }
            buf.truncate(k);
            return Ok(Some(buf));
        }
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            bail!("the chunked body ended early");
        }
        let size_text = line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {:?}", line.trim()))?;
        if size == 0 {
            self.done = true;
            return Ok(None);
        }
        let mut buf = vec![0u8; size];
        self.r.read_exact(&mut buf)?;
        line.clear();
        self.r.read_line(&mut line)?; // CRLF after the chunk
        Ok(Some(buf))
    }
}

/// Path (c): one OpenAI streaming chat completion through the proxy.
fn proxy_run(addr: SocketAddr, n: usize) -> Result<Run> {
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": n,
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let start = Instant::now();
    let mut s = connect(addr)?;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let (status, chunked) = read_head(&mut r)?;
    if status != 200 {
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        bail!("proxy answered {status}: {}", rest.trim());
    }
    let mut body = BodyReader {
        r,
        chunked,
        done: false,
    };
    let mut parser = SseParser::new();
    let mut text = String::new();
    let mut content_events: Vec<(Instant, usize)> = Vec::new();
    let mut completion_tokens: Option<usize> = None;
    let mut finished = false;
    'read: while let Some(piece) = body.next_piece()? {
        let now = Instant::now();
        for ev in parser.push(&piece)? {
            if ev.data == "[DONE]" {
                finished = true;
                break 'read;
            }
            let v: serde_json::Value = serde_json::from_str(&ev.data)
                .with_context(|| format!("proxy sent a non-JSON event {:?}", ev.data))?;
            if let Some(e) = v.get("error") {
                bail!("proxy stream error: {e}");
            }
            if let Some(u) = v.get("usage").and_then(|u| u.get("completion_tokens")) {
                completion_tokens = u.as_u64().map(|c| c as usize);
            }
            if let Some(c) = v
                .pointer("/choices/0/delta/content")
                .and_then(serde_json::Value::as_str)
            {
                if !c.is_empty() {
                    text.push_str(c);
                    content_events.push((now, 1));
                }
            }
        }
    }
    let end = Instant::now();
    if !finished {
        bail!("the proxy's stream ended without [DONE]");
    }
    // A content chunk normally carries one token; the usage chunk says how many there were.
    let mut run = Run::from_events(text, start, end, &content_events);
    if let Some(c) = completion_tokens {
        run.e2e_tok_s *= c as f64 / run.tokens.max(1) as f64;
        run.tokens = c;
    }
    Ok(run)
}

#[derive(Serialize)]
struct PathReport {
    decode_tok_s: f64,
    e2e_tok_s: f64,
    decode_tok_s_rounds: Vec<f64>,
    /// Median of the server's own decode rate (`timings.predicted_per_second`), server path only.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_clock_tok_s: Option<f64>,
}

#[derive(Serialize)]
struct BenchServeReport {
    threads: String,
    /// 1-minute load average before and after the run (Linux), to spot a busy machine.
    load_average: [Option<f64>; 2],
    tokens_requested: usize,
    tokens_generated: usize,
    rounds: usize,
    prompt: &'static str,
    direct: PathReport,
    /// `equicrypt bench-decode` in a fresh process per round (engine only, same prompt ids).
    direct_fresh_process_decode_tok_s: f64,
    direct_fresh_process_rounds: Vec<f64>,
    server: PathReport,
    proxy: PathReport,
    server_over_direct: f64,
    proxy_over_direct: f64,
    server_over_direct_e2e: f64,
    proxy_over_direct_e2e: f64,
    server_over_direct_fresh_process: f64,
    proxy_over_direct_fresh_process: f64,
    identical_outputs: bool,
}

/// The 1-minute load average (Linux only).
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn path_report(runs: &[Run]) -> PathReport {
    let d: Vec<f64> = runs.iter().map(|r| r.decode_tok_s).collect();
    let e: Vec<f64> = runs.iter().map(|r| r.e2e_tok_s).collect();
    let sc: Vec<f64> = runs.iter().filter_map(|r| r.server_clock_tok_s).collect();
    PathReport {
        decode_tok_s: median(&d),
        e2e_tok_s: median(&e),
        decode_tok_s_rounds: d,
        server_clock_tok_s: (!sc.is_empty()).then(|| median(&sc)),
    }
}

/// Runs `bench-serve`.
pub fn run(a: &BenchServeArgs) -> Result<()> {
    let threads = std::env::var("RAYON_NUM_THREADS").map_err(|_| {
        anyhow::anyhow!(
            "bench-serve needs RAYON_NUM_THREADS set (e.g. RAYON_NUM_THREADS=1): the direct run uses this process's setting and the server child gets the same"
        )
    })?;
    let load_before = load_average();
    let n = a.tokens as usize;
    let key = keyfile::read(&a.pair.key)?;
    let side = ClientSide::load(&a.pair.plain, &key)?;
    let mut engine = load_encrypted(&a.pair.encrypted, &key)?;
    let fingerprint = key.fingerprint();
    drop(key);
    let prompt_text = side.prompt_text(PROMPT, false)?;
    let stop = side.cipher.eog_cipher_ids()?;
    let exe = std::env::current_exe().context("cannot find the equicrypt binary")?;
    let logs = tempfile::tempdir().context("cannot create a temporary directory")?;

    let server_addr = free_port()?;
    let mut cmd = Command::new(&exe);
    cmd.arg("serve")
        .arg("--model")
        .arg(&a.pair.encrypted)
        .args(["--listen", &server_addr.to_string(), "--queue", "4"])
        .env("RAYON_NUM_THREADS", &threads);
    let mut server = ChildGuard::spawn("server", cmd, logs.path().join("server.log"))?;
    server.wait_healthy(server_addr, Duration::from_secs(60))?;
    let server_url = format!("http://{server_addr}");

    let proxy_addr = free_port()?;
    let mut cmd = Command::new(&exe);
    cmd.arg("proxy")
        .arg("--key")
        .arg(&a.pair.key)
        .arg("--tokenizer")
        .arg(&a.pair.plain)
        .args(["--server", &server_url])
        .args(["--listen", &proxy_addr.to_string()])
        .env("RAYON_NUM_THREADS", "1");
    let mut proxy = ChildGuard::spawn("proxy", cmd, logs.path().join("proxy.log"))?;
    proxy.wait_healthy(proxy_addr, Duration::from_secs(60))?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let client = RemoteClient::new(&server_url, Backend::Equicrypt)?;
    rt.block_on(client.check_fingerprint(&fingerprint))
        .context("the spawned server")?;
    let chat = BlindChat::new(&side.cipher, &client);

    let mut direct = || -> Result<Run> {
        let cprompt = side.cipher.encrypt_prompt(&prompt_text, true)?;
        engine.reset();
        let mut dec = side.cipher.decrypt_stream(false);
        let mut text = String::new();
        let mut events = Vec::with_capacity(n);
        let mut err = None;
        let start = Instant::now();
        generate(
            &mut engine,
            &cprompt,
            n,
            &SamplingParams::greedy(),
            &stop,
            |id| match dec.push(id) {
                Ok(s) => {
                    text.push_str(&s);
                    events.push((Instant::now(), 1));
                    true
                }
                Err(e) => {
                    err = Some(e);
                    false
                }
            },
        )?;
        if let Some(e) = err {
            return Err(e.into());
        }
        text.push_str(&dec.finish());
        Ok(Run::from_events(text, start, Instant::now(), &events))
    };
    let via_server = || -> Result<Run> {
        let mut events = Vec::with_capacity(n);
        let start = Instant::now();
        let out =
            rt.block_on(
                chat.generate(&prompt_text, GenerateParams::greedy(n), |_, ids| {
                    if !ids.is_empty() {
                        events.push((Instant::now(), ids.len()));
                    }
                }),
            )?;
        let mut run = Run::from_events(out.text, start, Instant::now(), &events);
        run.server_clock_tok_s = out.timings.map(|t| t.predicted_per_second);
        Ok(run)
    };
    let via_proxy = || proxy_run(proxy_addr, n);
    let cprompt = side.cipher.encrypt_prompt(&prompt_text, true)?;
    let fresh = || decode_in_child(&exe, &a.pair.encrypted, &cprompt, n, &threads);

    eprintln!("warm-up");
    let reference = direct()?;
    let s0 = via_server()?;
    let p0 = proxy_run(proxy_addr, n)?;
    if reference.tokens < 2 {
        bail!(
            "the prompt produced only {} tokens; decode speed needs at least 2",
            reference.tokens
        );
    }
    let mut identical = s0.text == reference.text && p0.text.trim() == reference.text.trim();
    let (mut d, mut s, mut p, mut f) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..a.rounds as usize {
        eprintln!("round {}/{}", r + 1, a.rounds);
        // Rotate the order so that no path always runs first or last.
        for k in 0..4 {
            match (r + k) % 4 {
                0 => d.push(direct()?),
                1 => s.push(via_server()?),
                2 => p.push(via_proxy()?),
                _ => f.push(fresh()?),
            }
        }
    }
    identical &=
        d.iter().chain(&s).all(|x| x.text == reference.text) && p.iter().all(|x| x.text == p0.text);
    // The child processes must still be alive: a crash would have surfaced as an error above,
    // but check before reporting.
    for c in [&mut server, &mut proxy] {
        if let Some(st) = c.child.try_wait()? {
            bail!("the {} child exited during the benchmark ({st})", c.name);
        }
    }
    drop(proxy);
    drop(server);

    let report = BenchServeReport {
        threads,
        load_average: [load_before, load_average()],
        tokens_requested: n,
        tokens_generated: reference.tokens,
        rounds: a.rounds as usize,
        prompt: PROMPT,
        server_over_direct: 0.0,
        proxy_over_direct: 0.0,
        server_over_direct_e2e: 0.0,
        proxy_over_direct_e2e: 0.0,
        direct: path_report(&d),
        direct_fresh_process_decode_tok_s: median(&f),
        direct_fresh_process_rounds: f,
        server_over_direct_fresh_process: 0.0,
        proxy_over_direct_fresh_process: 0.0,
        server: path_report(&s),
        proxy: path_report(&p),
        identical_outputs: identical,
    };
    let report = BenchServeReport {
        server_over_direct: report.server.decode_tok_s / report.direct.decode_tok_s,
        proxy_over_direct: report.proxy.decode_tok_s / report.direct.decode_tok_s,
        server_over_direct_e2e: report.server.e2e_tok_s / report.direct.e2e_tok_s,
        proxy_over_direct_e2e: report.proxy.e2e_tok_s / report.direct.e2e_tok_s,
        server_over_direct_fresh_process: report.server.decode_tok_s
            / report.direct_fresh_process_decode_tok_s,
        proxy_over_direct_fresh_process: report.proxy.decode_tok_s
            / report.direct_fresh_process_decode_tok_s,
        ..report
    };
    print_report(&report);
    if let Some(path) = &a.json {
        write_json(path, &report)?;
    }
    Ok(())
}

/// `equicrypt bench-decode` on `model` in a fresh process (what `bench` measures): decode tok/s.
fn decode_in_child(
    exe: &Path,
    model: &Path,
    prompt: &[u32],
    n: usize,
    threads: &str,
) -> Result<f64> {
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let out = Command::new(exe)
        .arg("bench-decode")
        .arg("--model")
        .arg(model)
        .args(["--tokens", &n.to_string(), "--prompt-ids", &ids.join(",")])
        .env("RAYON_NUM_THREADS", threads)
        .stdin(Stdio::null())
        .output()
        .context("cannot start the bench-decode child process")?;
    if !out.status.success() {
        bail!(
            "bench-decode child failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("bench-decode printed no rate")
}

fn print_report(r: &BenchServeReport) {
    println!("threads (RAYON_NUM_THREADS): {}", r.threads);
    if let [Some(b), Some(a)] = r.load_average {
        println!("load average (1 min) before/after: {b:.2} / {a:.2} (other work on the machine skews the ratios)");
    }
    println!(
        "tokens: {} generated of {} requested, {} rounds (medians), prompt {:?}",
        r.tokens_generated, r.tokens_requested, r.rounds, r.prompt
    );
    println!("                      decode tok/s   end-to-end tok/s");
    for (name, p) in [
        ("direct (in-process)", &r.direct),
        ("server + client", &r.server),
        ("proxy + server", &r.proxy),
    ] {
        println!("{name:<22}{:>12.1}{:>19.1}", p.decode_tok_s, p.e2e_tok_s);
    }
    println!(
        "{:<22}{:>12.1}",
        "direct (fresh process)", r.direct_fresh_process_decode_tok_s
    );
    println!(
        "server ÷ direct:      {:>12.3}{:>19.3}",
        r.server_over_direct, r.server_over_direct_e2e
    );
    println!(
        "proxy+server ÷ direct:{:>12.3}{:>19.3}",
        r.proxy_over_direct, r.proxy_over_direct_e2e
    );
    println!(
        "vs the fresh-process direct run: server {:.3}, proxy+server {:.3}",
        r.server_over_direct_fresh_process, r.proxy_over_direct_fresh_process
    );
    if let Some(sc) = r.server.server_clock_tok_s {
        println!("server's own clock:    {sc:>11.1} tok/s (timings.predicted_per_second)");
    }
    println!(
        "identical outputs on all paths: {}",
        if r.identical_outputs { "yes" } else { "NO" }
    );
}

fn write_json(path: &Path, r: &BenchServeReport) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(r)?)
        .with_context(|| format!("cannot write {}", path.display()))
}
