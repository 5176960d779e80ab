//! Robustness: ≥ 10,000 random and malformed requests; no answer may be a 5xx, every 4xx is JSON,
//! and the server still answers `/health` afterwards.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{metric, start, Opts};
use equicrypt_server::Limits;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const KEYS: [&str; 22] = [
    "prompt",
    "n_predict",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "repeat_penalty",
    "repeat_last_n",
    "stop_ids",
    "stream",
    "n_probs",
    "return_tokens",
    "cache_prompt",
    "model",
    "max_tokens",
    "stop",
    "logprobs",
    "bogus",
    "",
    "prompt ",
    "PROMPT",
    "n_predict\u{0}",
];

fn random_value(r: &mut Rng, depth: usize) -> Value {
    match r.below(if depth > 3 { 12 } else { 15 }) {
        0 => json!(null),
        1 => json!(r.below(2) == 0),
        2 => json!(r.below(200) as i64 - 100),
        3 => json!(*r.pick(&[
            i64::MIN,
            i64::MAX,
            -1,
            0,
            95,
            96,
            255,
            256,
            2048,
            2049,
            4294967295,
            4294967296
        ])),
        4 => json!(u64::MAX),
        5 => json!(*r.pick(&[0.0, -0.0, 1e-45, 0.5, 1.0, 1.5, -3.7, 1e30, 1e39, -1e308, 1e308])),
        6 => json!(*r.pick(&["", "hello", "NaN", "Infinity", "-1", "[1,2]", "\u{0}", "ü💥"])),
        7 | 8 => {
            let n = r.below(12);
            json!((0..n).map(|_| r.below(120)).collect::<Vec<_>>())
        }
        9 => {
            let n = r.below(4);
            Value::Array((0..n).map(|_| random_value(r, depth + 1)).collect())
        }
        10 => json!([r.next() as i64, -5, 1.5]),
        11 => json!(vec![1; r.below(300)]),
        _ => {
            let mut m = Map::new();
            for _ in 0..r.below(4) {
                m.insert(r.pick(&KEYS).to_string(), random_value(r, depth + 1));
            }
            Value::Object(m)
        }
    }
}

fn base(r: &mut Rng, openai: bool) -> Value {
    let prompt: Vec<usize> = (0..1 + r.below(8)).map(|_| r.below(96)).collect();
    if openai {
        json!({"prompt": prompt, "max_tokens": r.below(6), "temperature": 0.7, "seed": r.below(9), "stream": r.below(3) == 0})
    } else {
        json!({"prompt": prompt, "n_predict": r.below(6), "temperature": 0.7, "top_k": 20,
               "seed": r.below(9), "stream": r.below(3) == 0, "n_probs": r.below(3)})
    }
}

fn mutate(r: &mut Rng, v: &mut Value) {
    let obj = v.as_object_mut().unwrap();
    for _ in 0..r.below(4) {
        match r.below(4) {
            0 => {
                let k = r.pick(&KEYS).to_string();
                obj.insert(k, random_value(r, 0));
            }
            1 => {
                let keys: Vec<String> = obj.keys().cloned().collect();
                if !keys.is_empty() {
                    let k = r.pick(&keys).clone();
                    obj.remove(&k);
                }
            }
            _ => {
                let keys: Vec<String> = obj.keys().cloned().collect();
                if !keys.is_empty() {
                    let k = r.pick(&keys).clone();
                    obj.insert(k, random_value(r, 0));
                }
            }
        }
    }
}

struct Case {
    method: String,
    path: String,
    body: Vec<u8>,
    content_type: Option<&'static str>,
}

const PATHS: [&str; 12] = [
    "/completion",
    "/completions",
    "/v1/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/",
    "/v1",
    "/completion/",
    "/v1/models/x",
    "/%00",
    "/a/b/c?x=1",
];

fn case(r: &mut Rng) -> Case {
    let gen_path = |r: &mut Rng| {
        if r.below(2) == 0 {
            "/completion"
        } else {
            "/v1/completions"
        }
        .to_string()
    };
    let ct = |r: &mut Rng| {
        *r.pick(&[
            Some("application/json"),
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
        ])
    };
    match r.below(10) {
        // Mutated valid-looking bodies.
        0..=4 => {
            let path = gen_path(r);
            let mut v = base(r, path == "/v1/completions");
            mutate(r, &mut v);
            let mut body = serde_json::to_vec(&v).unwrap();
            if r.below(8) == 0 {
                // Truncate or corrupt a byte.
                let i = r.below(body.len());
                if r.below(2) == 0 {
                    body.truncate(i);
                } else {
                    body[i] = r.next() as u8;
                }
            }
            Case {
                method: "POST".into(),
                path,
                body,
                content_type: ct(r),
            }
        }
        // Any JSON value as the whole body.
        5 => Case {
            method: "POST".into(),
            path: gen_path(r),
            body: serde_json::to_vec(&random_value(r, 0)).unwrap(),
            content_type: ct(r),
        },
        // Random bytes.
        6 => {
            let n = r.below(300);
            Case {
                method: "POST".into(),
                path: gen_path(r),
                body: (0..n).map(|_| r.next() as u8).collect(),
                content_type: ct(r),
            }
        }
        // Deeply nested JSON.
        7 => {
            let d = 1 + r.below(400);
            let body = format!("{{\"prompt\":{}1{}}}", "[".repeat(d), "]".repeat(d)).into_bytes();
            Case {
                method: "POST".into(),
                path: gen_path(r),
                body,
                content_type: ct(r),
            }
        }
        // Random method and path.
        _ => {
            let method = r
                .pick(&[
                    "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO", "CONNECTX",
                ])
                .to_string();
            let mut path = r.pick(&PATHS).to_string();
            if r.below(3) == 0 {
                path.push_str(&format!("/{}", r.next() % 1000));
            }
            let body = if r.below(2) == 0 {
                Vec::new()
            } else {
                b"{\"prompt\":[1]}".to_vec()
            };
            Case {
                method,
                path,
                body,
                content_type: ct(r),
            }
        }
    }
}

/// Raw TCP requests that are not valid HTTP: the connection gets a 4xx or is closed, never a 5xx.
fn raw_garbage(addr: std::net::SocketAddr, r: &mut Rng) {
    let payloads: Vec<Vec<u8>> = vec![
        b"GARBAGE\r\n\r\n".to_vec(),
        b"POST /completion HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n".to_vec(),
        b"POST /completion HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        (0..200).map(|_| r.next() as u8).collect(),
        b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{\"pro".to_vec(),
    ];
    for p in payloads {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&p);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let head = String::from_utf8_lossy(&out);
        if let Some(code) = head.strip_prefix("HTTP/1.1 ").and_then(|h| h.get(..3)) {
            assert!(!code.starts_with('5'), "raw request answered {code}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_never_5xx() {
    const N: usize = 10_000;
    let s = start(Opts {
        limits: Limits {
            queue_capacity: 64,
            max_tokens: 16,
            ..Limits::default()
        },
        ..Opts::default()
    })
    .await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut r = Rng(0x5eed_1234_abcd_0001);
    let cases: Vec<Case> = (0..N).map(|_| case(&mut r)).collect();
    let t0 = Instant::now();
    let results: Vec<(u16, String, String)> = futures_util::stream::iter(cases)
        .map(|c| {
            let client = client.clone();
            let url = s.url(&c.path);
            async move {
                let method = reqwest::Method::from_bytes(c.method.as_bytes()).unwrap();
                let mut req = client.request(method.clone(), url).body(c.body);
                if let Some(ct) = c.content_type {
                    req = req.header("content-type", ct);
                }
                let resp = req
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{} {}: {e}", c.method, c.path));
                let status = resp.status().as_u16();
                let ct = resp
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let body = resp.text().await.unwrap_or_default();
                let head = if method == reqwest::Method::HEAD {
                    String::new()
                } else {
                    body
                };
                (status, ct, format!("{} {} -> {}", c.method, c.path, head))
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let elapsed = t0.elapsed();
    let mut by_status = std::collections::BTreeMap::new();
    for (status, ct, what) in &results {
        *by_status.entry(*status).or_insert(0usize) += 1;
        let what = what.as_str();
        assert!(*status < 500, "5xx: {what}");
        assert!(
            *status == 200 || (400..500).contains(status),
            "unexpected status {status}: {what}"
        );
        if *status >= 400 && !what.starts_with("HEAD ") {
            assert!(ct.starts_with("application/json"), "non-JSON error: {what}");
            let body = what.split_once(" -> ").unwrap().1;
            let e: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{what}"));
            assert!(e["error"]["type"].is_string() && e["error"]["message"].is_string());
        }
    }
    eprintln!("fuzz: {N} requests in {elapsed:?}: {by_status:?}");
    assert!(
        by_status.get(&200).copied().unwrap_or(0) > 0,
        "no valid request at all"
    );
    assert!(by_status.get(&400).copied().unwrap_or(0) > N / 4);

    let addr = s.addr;
    tokio::task::spawn_blocking(move || raw_garbage(addr, &mut Rng(7)))
        .await
        .unwrap();

    let h = client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    let m = s.metrics(&client).await;
    assert_eq!(metric(&m, "equicrypt_jobs_failed_total"), 0.0);
    assert_eq!(metric(&m, "equicrypt_queue_depth"), 0.0);
    s.stop().await;
}
