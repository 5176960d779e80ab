//! `equicrypt loadtest`: a bounded load test of a blind server on this machine.
//!
//! The same N chat requests (the built-in prompts cycled, request `i` sampled with seed
//! `seed + i`) run first one after another, then all at once (N tokio tasks, each streaming
//! through [`BlindChat`]). Every concurrent answer must decrypt to exactly the text and ciphertext
//! ids of its sequential counterpart: the server is deterministic for a given seed, so any
//! difference means requests interfered with each other (mixed-up streams, shared sampler or KV
//! state). The command stops by itself: a fixed number of requests and a hard overall timeout.
//!
//! Only loopback servers are accepted (`127.0.0.0/8`, `[::1]`): this is a load generator.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use equicrypt_client::remote::{Backend, BlindChat, GenerateParams, RemoteClient};
use equicrypt_client::ClientError;
use serde::Serialize;

use crate::keyfile;
use crate::session::ClientSide;

/// Most retries of one request answered 503 (the server asks for 1 s between tries).
const MAX_BUSY_RETRIES: usize = 60;

/// Arguments of `loadtest`.
#[derive(Args)]
pub struct LoadtestArgs {
    /// Key file.
    #[arg(long)]
    key: PathBuf,
    /// Plaintext model whose tokenizer and chat template the client uses: a GGUF, or a
    /// transformers checkpoint directory.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Blind server URL (loopback only: 127.0.0.0/8 or [::1]).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Requests, i.e. concurrent clients in the second phase (size the server's --queue to at
    /// least this minus one to avoid 503s).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=256))]
    clients: u64,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=512))]
    tokens: u64,
    /// Base seed (request i uses seed + i).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Hard limit on the whole run, in seconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=600))]
    timeout_s: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Refuses any server that is not an IP literal on loopback (127.0.0.0/8 or ::1). Host names are
/// refused too, even `localhost`: what they resolve to is not this command's to check.
pub fn check_loopback_url(url: &str) -> Result<()> {
    let refuse = || {
        anyhow::anyhow!(
            "refusing to load-test {url}: only loopback servers are allowed (http://127.0.0.1:PORT or http://[::1]:PORT)"
        )
    };
    // No userinfo and no backslashes anywhere: parsers disagree on where such hosts end.
    if url.contains(['@', '\\']) {
        return Err(refuse());
    }
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(refuse)?;
    let authority = rest
        .split(['/', '\\', '?', '#'])
        .next()
        .ok_or_else(refuse)?;
    if authority.contains('@') || authority.is_empty() {
        return Err(refuse());
    }
    let host = if let Some(v6) = authority.strip_prefix('[') {
        let (h, tail) = v6.split_once(']').ok_or_else(refuse)?;
        if !(tail.is_empty() || tail.starts_with(':')) {
            return Err(refuse());
        }
        h
    } else {
        match authority.rsplit_once(':') {
            Some((h, _port)) => h,
            None => authority,
        }
    };
    let port_ok = match authority.rsplit_once(':') {
        Some((_, p)) if !authority.ends_with(']') => p.parse::<u16>().is_ok(),
        _ => true,
    };
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() && port_ok => Ok(()),
        _ => Err(refuse()),
    }
}

/// One finished request.
#[derive(Clone, Debug)]
struct Outcome {
    text: String,
    cipher_ids: Vec<u32>,
    /// From the request's start (including 503 retries) to its end.
    latency: Duration,
    /// From the request's start to the first ciphertext id.
    ttft: Option<Duration>,
    busy_rejections: usize,
}

/// Runs request `params` through `chat`, retrying while the server answers 503.
async fn one_request(
    chat: BlindChat<'_>,
    prompt: &str,
    params: &GenerateParams,
    start: Instant,
) -> Result<Outcome, ClientError> {
    let mut busy = 0;
    loop {
        let mut first: Option<Duration> = None;
        let r = chat
            .generate(prompt, params.clone(), |_, ids| {
                if first.is_none() && !ids.is_empty() {
                    first = Some(start.elapsed());
                }
            })
            .await;
        match r {
            Ok(out) => {
                return Ok(Outcome {
                    text: out.text,
                    cipher_ids: out.cipher_ids,
                    latency: start.elapsed(),
                    ttft: first,
                    busy_rejections: busy,
                })
            }
            Err(ClientError::Server { status: 503, .. }) if busy < MAX_BUSY_RETRIES => {
                busy += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Latency percentiles and throughput of one phase.
#[derive(Serialize, Debug)]
struct PhaseReport {
    wall_s: f64,
    tokens: usize,
    tokens_per_s: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    busy_rejections: usize,
}

#[derive(Serialize, Debug)]
struct LoadtestReport {
    server: String,
    clients: usize,
    tokens_per_request: usize,
    temperature: f32,
    seed: u64,
    sequential: PhaseReport,
    concurrent: PhaseReport,
    concurrent_over_sequential_throughput: f64,
    failures: usize,
    mismatches: usize,
    mismatched_requests: Vec<usize>,
}

/// Nearest-rank percentile of `v` (sorted here), in milliseconds; 0 for an empty slice.
fn percentile_ms(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1].as_secs_f64() * 1e3
}

fn phase_report(outcomes: &[Outcome], wall: Duration) -> PhaseReport {
    let tokens: usize = outcomes.iter().map(|o| o.cipher_ids.len()).sum();
    let mut lat: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
    let mut ttft: Vec<Duration> = outcomes.iter().filter_map(|o| o.ttft).collect();
    PhaseReport {
        wall_s: wall.as_secs_f64(),
        tokens,
        tokens_per_s: tokens as f64 / wall.as_secs_f64(),
        latency_p50_ms: percentile_ms(&mut lat, 0.50),
        latency_p99_ms: percentile_ms(&mut lat, 0.99),
        ttft_p50_ms: percentile_ms(&mut ttft, 0.50),
        ttft_p99_ms: percentile_ms(&mut ttft, 0.99),
        busy_rejections: outcomes.iter().map(|o| o.busy_rejections).sum(),
    }
}

fn print_phase(name: &str, p: &PhaseReport) {
    println!(
        "{name:<11} {:>6} tokens in {:>7.2} s = {:>7.1} tok/s | latency p50 {:>8.1} ms p99 {:>8.1} ms | TTFT p50 {:>8.1} ms p99 {:>8.1} ms | 503s {}",
        p.tokens,
        p.wall_s,
        p.tokens_per_s,
        p.latency_p50_ms,
        p.latency_p99_ms,
        p.ttft_p50_ms,
        p.ttft_p99_ms,
        p.busy_rejections
    );
}

/// Runs `loadtest`.
pub fn run(a: &LoadtestArgs) -> Result<()> {
    check_loopback_url(&a.server)?;
    let n = a.clients as usize;
    let key = keyfile::read(&a.key)?;
    let fingerprint = key.fingerprint();
    let side = Arc::new(ClientSide::load(&a.tokenizer, &key)?);
    drop(key);
    let lines: Vec<&str> = crate::verify::PROMPTS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    // N distinct prompts: the built-in ones, cycled; repeats get a numbered suffix.
    let prompts: Vec<String> = (0..n)
        .map(|i| {
            let base = lines[i % lines.len()];
            let user = if i < lines.len() {
                base.to_string()
            } else {
                format!("{base} (request {i})")
            };
            side.prompt_text(&user, false)
        })
        .collect::<Result<_>>()?;
    let params: Vec<GenerateParams> = (0..n)
        .map(|i| GenerateParams {
            max_tokens: a.tokens as usize,
            temperature: a.temperature,
            seed: a.seed.wrapping_add(i as u64),
            ..GenerateParams::default()
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let timeout = Duration::from_secs(a.timeout_s);
    let report = rt.block_on(async {
        let client = RemoteClient::new(&a.server, Backend::Equicrypt)?;
        client
            .wait_healthy(Duration::from_secs(10))
            .await
            .with_context(|| format!("server {}", a.server))?;
        client
            .check_fingerprint(&fingerprint)
            .await
            .with_context(|| format!("server {}", a.server))?;
        tokio::time::timeout(timeout, phases(side, client, prompts, params, a))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the load test did not finish within its {} s limit",
                    a.timeout_s
                )
            })?
    })?;
    print_phase("sequential", &report.sequential);
    print_phase("concurrent", &report.concurrent);
    println!(
        "concurrent ÷ sequential throughput: {:.3}",
        report.concurrent_over_sequential_throughput
    );
    println!(
        "mismatches (concurrent vs sequential, same seed): {} of {}; failed requests: {}",
        report.mismatches, n, report.failures
    );
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if report.failures > 0 || report.mismatches > 0 {
        bail!(
            "{} of {} concurrent answers differ from their sequential runs and {} requests failed (requests {:?})",
            report.mismatches,
            n,
            report.failures,
            report.mismatched_requests
        );
    }
    Ok(())
}

async fn phases(
    side: Arc<ClientSide>,
    client: RemoteClient,
    prompts: Vec<String>,
    params: Vec<GenerateParams>,
    a: &LoadtestArgs,
) -> Result<LoadtestReport> {
    let n = prompts.len();
    eprintln!(
        "sequential: {n} requests of {} tokens to {}",
        a.tokens, a.server
    );
    let chat = BlindChat::new(&side.cipher, &client);
    let t0 = Instant::now();
    let mut seq = Vec::with_capacity(n);
    for (i, (p, g)) in prompts.iter().zip(&params).enumerate() {
        let o = one_request(chat, p, g, Instant::now())
            .await
            .with_context(|| format!("sequential request {i}"))?;
        seq.push(o);
    }
    let seq_wall = t0.elapsed();

    eprintln!("concurrent: {n} requests at once");
    let prompts = Arc::new(prompts);
    let params = Arc::new(params);
    let mut set = tokio::task::JoinSet::new();
    let t0 = Instant::now();
    for i in 0..n {
        let (side, client, prompts, params) = (
            side.clone(),
            client.clone(),
            prompts.clone(),
            params.clone(),
        );
        set.spawn(async move {
            let chat = BlindChat::new(&side.cipher, &client);
            (
                i,
                one_request(chat, &prompts[i], &params[i], Instant::now()).await,
            )
        });
    }
    let mut conc: Vec<Option<Outcome>> = vec![None; n];
    let mut failures = 0;
    while let Some(joined) = set.join_next().await {
        let (i, r) = joined.context("a client task panicked")?;
        match r {
            Ok(o) => conc[i] = Some(o),
            Err(e) => {
                failures += 1;
                eprintln!("concurrent request {i} failed: {e}");
            }
        }
    }
    let conc_wall = t0.elapsed();
    let mut mismatched = Vec::new();
    for (i, (s, c)) in seq.iter().zip(&conc).enumerate() {
        if let Some(c) = c {
            if c.text != s.text || c.cipher_ids != s.cipher_ids {
                mismatched.push(i);
            }
        }
    }
    let done: Vec<Outcome> = conc.into_iter().flatten().collect();
    let sequential = phase_report(&seq, seq_wall);
    let concurrent = phase_report(&done, conc_wall);
    Ok(LoadtestReport {
        server: a.server.clone(),
        clients: n,
        tokens_per_request: a.tokens as usize,
        temperature: a.temperature,
        seed: a.seed,
        concurrent_over_sequential_throughput: concurrent.tokens_per_s / sequential.tokens_per_s,
        sequential,
        concurrent,
        failures,
        mismatches: mismatched.len(),
        mismatched_requests: mismatched,
    })
}

#[cfg(test)]
mod tests {
    use super::check_loopback_url;

    #[test]
    fn only_loopback_literals_pass() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "http://127.3.4.5:1/prefix",
            "http://[::1]:8080",
            "https://[::1]",
            "http://127.0.0.1",
        ] {
            assert!(check_loopback_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8080",
            "http://localhost:8080",
            "http://example.com",
            "http://127.0.0.1@evil.com/",
            "http://127.0.0.1\\@evil.com/",
            "http://evil.com#@127.0.0.1",
            "http://[::ffff:127.0.0.1]:80",
            "http://0.0.0.0:8080",
            "ftp://127.0.0.1",
            "127.0.0.1:8080",
            "http://127.0.0.1:99999",
            "http://[::1]x:80",
        ] {
            assert!(check_loopback_url(bad).is_err(), "{bad}");
        }
    }
}
