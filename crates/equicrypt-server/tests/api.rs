//! End-to-end tests of the HTTP API on a tiny encrypted model, over real sockets.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{metric, parse_prometheus, sse_data, start, Opts, TestServer};
use equicrypt_engine::{generate, Generation, LlamaModel, SamplingParams, StopReason};
use equicrypt_protocol::{
    CompletionResponse, ErrorBody, ModelList, OpenAiCompletionResponse, StopType,
};
use equicrypt_server::Limits;
use futures_util::StreamExt;
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Log capture: one global subscriber for this test binary, writing every level to a buffer.

#[derive(Clone)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = Buf(buf.clone());
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || w.clone())
            .init();
        buf
    })
    .clone()
}

async fn server(opts: Opts) -> TestServer {
    logs();
    start(opts).await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn reference(
    model: &Path,
    prompt: &[u32],
    n: usize,
    params: &SamplingParams,
    stops: &[u32],
) -> Generation {
    let mut m = LlamaModel::load(model).unwrap();
    generate(&mut m, prompt, n, params, stops, |_| true).unwrap()
}

fn stop_type(g: &Generation) -> StopType {
    match g.stop {
        StopReason::StopToken(_) => StopType::Eos,
        _ => StopType::Limit,
    }
}

async fn post(c: &reqwest::Client, url: &str, body: serde_json::Value) -> reqwest::Response {
    c.post(url).json(&body).send().await.unwrap()
}

async fn stream_completion(
    c: &reqwest::Client,
    s: &TestServer,
    body: serde_json::Value,
) -> Vec<CompletionResponse> {
    let r = post(c, &s.url("/completion"), body).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    sse_data(&r.text().await.unwrap())
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

async fn assert_error(r: reqwest::Response, status: u16, kind: &str) -> ErrorBody {
    assert_eq!(r.status(), status, "status");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let e: ErrorBody = r.json().await.unwrap();
    assert_eq!(e.error.kind, kind, "{e:?}");
    assert!(!e.error.message.is_empty());
    e
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_matches_in_process_generate() {
    let s = server(Opts::default()).await;
    let c = client();
    let eos = s.meta.eos_id.expect("encrypted model declares EOS");
    let prompt = vec![5u32, 17, 42, 3, 88, 61];
    let cases = [
        json!({"temperature": 0.0}),
        json!({"temperature": 0.9, "seed": 11}),
        json!({"temperature": 1.3, "top_k": 0, "top_p": 0.8, "seed": 5}),
        json!({"temperature": 0.7, "top_k": 5, "repeat_penalty": 1.3, "repeat_last_n": 8, "seed": 99}),
    ];
    for case in cases {
        let mut body = case.clone();
        body["prompt"] = json!(prompt);
        body["n_predict"] = json!(24);
        let params: SamplingParams = serde_json::from_value(case.clone()).unwrap();
        let want = reference(&s.model, &prompt, 24, &params, &[eos]);

        let r: CompletionResponse = post(&c, &s.url("/completion"), body.clone())
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(r.tokens, want.tokens, "non-stream {case}");
        assert_eq!(r.stop_type, stop_type(&want));
        assert!(r.stop && r.content.is_empty());
        assert_eq!(r.tokens_predicted, want.tokens.len());
        assert_eq!(r.tokens_evaluated, prompt.len());
        let t = r.timings.unwrap();
        assert_eq!(
            (t.prompt_n, t.predicted_n),
            (prompt.len(), want.tokens.len())
        );

        body["stream"] = json!(true);
        let chunks = stream_completion(&c, &s, body).await;
        let (last, toks) = chunks.split_last().unwrap();
        let ids: Vec<u32> = toks.iter().flat_map(|c| c.tokens.clone()).collect();
        assert_eq!(ids, want.tokens, "stream {case}");
        for (i, ch) in toks.iter().enumerate() {
            assert!(!ch.stop && ch.stop_type == StopType::None && ch.timings.is_none());
            assert_eq!(ch.tokens_predicted, i + 1);
        }
        assert!(last.stop && last.tokens.is_empty());
        assert_eq!(last.stop_type, stop_type(&want));
        assert_eq!(
            last.timings.as_ref().unwrap().predicted_n,
            want.tokens.len()
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ids_and_eos_stop_generation() {
    let s = server(Opts::default()).await;
    let c = client();
    let eos = s.meta.eos_id.unwrap();
    let prompt = vec![9u32, 8, 7];
    // stop_ids: the 4th greedy token (first occurrence) ends generation before it.
    let full = reference(&s.model, &prompt, 12, &SamplingParams::greedy(), &[eos]);
    assert!(full.tokens.len() >= 4, "greedy run too short: {full:?}");
    let stop = full.tokens[3];
    let cut = full.tokens.iter().position(|&t| t == stop).unwrap();
    let r: CompletionResponse = post(
        &c,
        &s.url("/completion"),
        json!({"prompt": prompt, "n_predict": 12, "temperature": 0, "stop_ids": [stop]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(r.tokens, full.tokens[..cut]);
    assert_eq!(r.stop_type, StopType::Eos);

    // EOS from the file's metadata: find a seed whose hot sampling reaches EOS.
    let hot = |seed| SamplingParams {
        temperature: 3.0,
        top_k: 0,
        top_p: 1.0,
        seed,
        ..SamplingParams::default()
    };
    let seed = (0..200u64)
        .find(|&seed| {
            let g = reference(&s.model, &prompt, 200, &hot(seed), &[eos]);
            g.stop == StopReason::StopToken(eos)
        })
        .expect("no seed reaches EOS");
    let want = reference(&s.model, &prompt, 200, &hot(seed), &[eos]);
    let unstopped = reference(&s.model, &prompt, 200, &hot(seed), &[]);
    assert_eq!(unstopped.tokens[want.tokens.len()], eos);
    let r: CompletionResponse = post(
        &c,
        &s.url("/completion"),
        json!({"prompt": prompt, "n_predict": 200, "temperature": 3.0, "top_k": 0, "top_p": 1.0, "seed": seed}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(r.tokens, want.tokens);
    assert_eq!(r.stop_type, StopType::Eos);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_probs_shape() {
    let s = server(Opts::default()).await;
    let c = client();
    let body = json!({"prompt": [1, 2, 3], "n_predict": 6, "temperature": 0, "n_probs": 5});
    let r: CompletionResponse = post(&c, &s.url("/completion"), body.clone())
        .await
        .json()
        .await
        .unwrap();
    assert!(!r.tokens.is_empty());
    assert_eq!(r.completion_probabilities.len(), r.tokens.len());
    for (p, &id) in r.completion_probabilities.iter().zip(&r.tokens) {
        assert_eq!(p.id, id);
        assert_eq!(p.top_logprobs.len(), 5);
        // Greedy: the chosen id is the most likely one.
        assert_eq!(p.top_logprobs[0].id, id);
        assert_eq!(p.top_logprobs[0].logprob, p.logprob);
        assert!(p
            .top_logprobs
            .windows(2)
            .all(|w| w[0].logprob >= w[1].logprob));
        assert!(p
            .top_logprobs
            .iter()
            .all(|t| t.logprob <= 0.0 && t.logprob.is_finite()));
        let mass: f32 = p.top_logprobs.iter().map(|t| t.logprob.exp()).sum();
        assert!(mass > 0.0 && mass <= 1.0 + 1e-5);
    }
    // Streaming: one position per token chunk.
    let mut sbody = body;
    sbody["stream"] = json!(true);
    let chunks = stream_completion(&c, &s, sbody).await;
    let (_, toks) = chunks.split_last().unwrap();
    for ch in toks {
        assert_eq!(ch.completion_probabilities.len(), 1);
        assert_eq!(ch.completion_probabilities[0].top_logprobs.len(), 5);
    }
    let probs: Vec<_> = toks
        .iter()
        .flat_map(|c| c.completion_probabilities.clone())
        .collect();
    assert_eq!(probs, r.completion_probabilities);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_completions_non_stream_and_stream() {
    let s = server(Opts::default()).await;
    let c = client();
    let eos = s.meta.eos_id.unwrap();
    let prompt = vec![11u32, 22, 33, 44];
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 0,
        top_p: 0.9,
        repeat_penalty: 1.0,
        repeat_last_n: 0,
        seed: 3,
    };
    let want = reference(&s.model, &prompt, 10, &params, &[eos]);
    let finish = if want.stop == StopReason::MaxTokens {
        "length"
    } else {
        "stop"
    };
    let body = json!({"model": "x", "prompt": prompt, "max_tokens": 10, "temperature": 0.8, "top_p": 0.9, "seed": 3});
    let r: OpenAiCompletionResponse = post(&c, &s.url("/v1/completions"), body.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r.object, "text_completion");
    assert_eq!(r.model, "tiny-enc");
    assert_eq!(r.choices[0].tokens, want.tokens);
    assert_eq!(r.choices[0].text, "");
    assert_eq!(r.choices[0].finish_reason.as_deref(), Some(finish));
    let u = r.usage.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (4, want.tokens.len(), 4 + want.tokens.len())
    );

    let mut sbody = body;
    sbody["stream"] = json!(true);
    let resp = post(&c, &s.url("/v1/completions"), sbody).await;
    assert_eq!(resp.status(), 200);
    let data = sse_data(&resp.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<OpenAiCompletionResponse> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (last, toks) = chunks.split_last().unwrap();
    let ids: Vec<u32> = toks
        .iter()
        .flat_map(|c| c.choices[0].tokens.clone())
        .collect();
    assert_eq!(ids, want.tokens);
    assert!(toks.iter().all(|c| c.choices[0].finish_reason.is_none()));
    assert_eq!(last.choices[0].finish_reason.as_deref(), Some(finish));
    assert_eq!(
        last.usage.as_ref().unwrap().completion_tokens,
        want.tokens.len()
    );
    // A max_tokens limit gives "length".
    let r: OpenAiCompletionResponse = post(
        &c,
        &s.url("/v1/completions"),
        json!({"prompt": [1], "max_tokens": 1, "temperature": 0}),
    )
    .await
    .json()
    .await
    .unwrap();
    if r.choices[0].tokens.len() == 1 {
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some("length"));
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_predict_is_clipped_to_the_context() {
    let s = server(Opts {
        eos: false,
        ..Opts::default()
    })
    .await;
    let c = client();
    let prompt: Vec<u32> = (0..250).map(|i| (i * 7 % 96) as u32).collect();
    let want = reference(&s.model, &prompt, 100, &SamplingParams::greedy(), &[]);
    assert_eq!(want.stop, StopReason::ContextFull);
    let r: CompletionResponse = post(
        &c,
        &s.url("/completion"),
        json!({"prompt": prompt, "n_predict": 100, "temperature": 0}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(r.tokens, want.tokens);
    assert_eq!(r.stop_type, StopType::Limit);
    // n_predict -1 means the server limit (here clipped by the context too).
    let r = post(
        &c,
        &s.url("/completion"),
        json!({"prompt": [1, 2], "n_predict": -1, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let r: CompletionResponse = r.json().await.unwrap();
    assert_eq!(r.tokens.len(), 256 - 2 + 1);
    // n_predict 0: nothing, "limit".
    let r: CompletionResponse = post(
        &c,
        &s.url("/completion"),
        json!({"prompt": [1, 2], "n_predict": 0}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(r.tokens.is_empty());
    assert_eq!(r.stop_type, StopType::Limit);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_json_400() {
    let s = server(Opts::default()).await;
    let c = client();
    let long: Vec<u32> = vec![1; 256];
    let raw: Vec<(&str, String)> = vec![
        ("/completion", "hello".into()),
        ("/completion", "".into()),
        ("/completion", "{\"prompt\":[1,2".into()),
        ("/completion", "null".into()),
        ("/completion", "[1,2,3]".into()),
        ("/completion", "{\"prompt\":[1],\"temperature\":NaN}".into()),
        ("/completion", "\u{0}\u{1}\u{2}\u{ff}".into()),
        ("/v1/completions", "garbage".into()),
        ("/v1/completions", "[]".into()),
    ];
    for (path, body) in raw {
        let r = c
            .post(s.url(path))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_error(r, 400, "invalid_request_error").await;
    }
    let bodies = vec![
        ("/completion", json!({})),
        ("/completion", json!({"prompt": []})),
        ("/completion", json!({"prompt": "hello"})),
        ("/completion", json!({"prompt": [1, 2], "bogus": 1})),
        ("/completion", json!({"prompt": [96]})),
        ("/completion", json!({"prompt": [4294967296u64]})),
        ("/completion", json!({"prompt": [-1]})),
        ("/completion", json!({"prompt": [1.5]})),
        ("/completion", json!({"prompt": long})),
        ("/completion", json!({"prompt": [1], "n_predict": 2049})),
        ("/completion", json!({"prompt": [1], "n_predict": -2})),
        ("/completion", json!({"prompt": [1], "n_predict": 1e30})),
        ("/completion", json!({"prompt": [1], "n_predict": "5"})),
        ("/completion", json!({"prompt": [1], "temperature": "hot"})),
        ("/completion", json!({"prompt": [1], "temperature": 1e39})),
        ("/completion", json!({"prompt": [1], "top_p": -0.5})),
        ("/completion", json!({"prompt": [1], "top_p": 0.0})),
        ("/completion", json!({"prompt": [1], "top_p": 1.5})),
        ("/completion", json!({"prompt": [1], "repeat_penalty": 0.0})),
        ("/completion", json!({"prompt": [1], "top_k": -1})),
        ("/completion", json!({"prompt": [1], "seed": -1})),
        ("/completion", json!({"prompt": [1], "stop_ids": [96]})),
        ("/completion", json!({"prompt": [1], "stop_ids": 3})),
        ("/completion", json!({"prompt": [1], "n_probs": 97})),
        ("/completion", json!({"prompt": [1], "stream": "yes"})),
        ("/v1/completions", json!({"prompt": [1], "stop": ["\n"]})),
        ("/v1/completions", json!({"prompt": "text"})),
        ("/v1/completions", json!({"prompt": [1], "max_tokens": -1})),
        (
            "/v1/completions",
            json!({"prompt": [1], "max_tokens": 5000}),
        ),
        ("/v1/completions", json!({"prompt": [1], "logprobs": 2})),
        ("/v1/completions", json!({"prompt": [], "max_tokens": 1})),
        ("/v1/completions", json!({"prompt": [1], "top_p": 2.0})),
    ];
    for (path, body) in bodies {
        let r = post(&c, &s.url(path), body.clone()).await;
        let st = r.status();
        assert_eq!(st, 400, "{path} {body}");
        assert_error(r, 400, "invalid_request_error").await;
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_not_found_method_not_allowed() {
    let s = server(Opts::default()).await;
    let c = client();
    // 2 MiB body against the 1 MiB cap.
    let mut big = String::from("{\"prompt\":[");
    while big.len() < 2 << 20 {
        big.push_str("1,");
    }
    big.push_str("1]}");
    let r = c
        .post(s.url("/completion"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    // The unread rest of the body makes the connection unusable: the server must say so.
    assert_eq!(
        r.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    assert_error(r, 413, "invalid_request_error").await;
    for path in ["/nope", "/v2/completions", "/completion/x", "/"] {
        let r = c.get(s.url(path)).send().await.unwrap();
        assert_error(r, 404, "not_found").await;
        let r = c.post(s.url(path)).body("{}").send().await.unwrap();
        assert_error(r, 404, "not_found").await;
    }
    for (method, path) in [
        ("GET", "/completion"),
        ("PUT", "/completion"),
        ("GET", "/v1/completions"),
        ("POST", "/health"),
        ("DELETE", "/v1/models"),
        ("POST", "/metrics"),
    ] {
        let r = c
            .request(method.parse().unwrap(), s.url(path))
            .send()
            .await
            .unwrap();
        assert_error(r, 405, "invalid_request_error").await;
    }
    // The server is still fine.
    let r = c.get(s.url("/health")).send().await.unwrap();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"status": "ok"})
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_shows_the_fingerprint() {
    let s = server(Opts::default()).await;
    let c = client();
    let r: ModelList = c
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r.object, "list");
    let m = &r.data[0];
    let fp = equicrypt_core::SecretKey::from_bytes([1; 32])
        .fingerprint()
        .0;
    assert_eq!(m.key_fingerprint.as_deref(), Some(fp.as_str()));
    assert_eq!(
        m.encryption_mode.as_deref(),
        Some(equicrypt_core::PermMode::default().as_str())
    );
    assert_eq!(
        (m.id.as_str(), m.vocab_size, m.context_length),
        ("tiny-enc", 96, 256)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_counters_move() {
    let s = server(Opts::default()).await;
    let c = client();
    let before = s.metrics(&c).await;
    parse_prometheus(&before);
    let r: CompletionResponse = post(
        &c,
        &s.url("/completion"),
        json!({"prompt": [4, 5, 6, 7], "n_predict": 5, "temperature": 0}),
    )
    .await
    .json()
    .await
    .unwrap();
    let _ = post(&c, &s.url("/completion"), json!({"prompt": []})).await;
    let after = s.metrics(&c).await;
    let d = |series: &str| metric(&after, series) - metric(&before, series);
    assert_eq!(
        d("equicrypt_requests_total{endpoint=\"completion\",status=\"200\"}"),
        1.0
    );
    assert_eq!(
        d("equicrypt_requests_total{endpoint=\"completion\",status=\"400\"}"),
        1.0
    );
    assert_eq!(d("equicrypt_tokens_generated_total"), r.tokens.len() as f64);
    assert_eq!(d("equicrypt_prompt_tokens_total"), 4.0);
    assert_eq!(d("equicrypt_jobs_completed_total"), 1.0);
    assert_eq!(
        d("equicrypt_request_duration_seconds_count{endpoint=\"completion\"}"),
        2.0
    );
    assert_eq!(metric(&after, "equicrypt_queue_depth"), 0.0);
    assert_eq!(metric(&after, "equicrypt_jobs_running"), 0.0);
    assert_eq!(metric(&after, "equicrypt_in_flight"), 1.0); // this very request
    for name in [
        "equicrypt_rejected_total{reason=\"queue_full\"}",
        "equicrypt_jobs_cancelled_total",
        "equicrypt_request_duration_seconds_bucket{endpoint=\"completion\",le=\"+Inf\"}",
    ] {
        assert!(
            parse_prometheus(&after).iter().any(|(s, _)| s == name),
            "{name}"
        );
    }
    s.stop().await;
}

async fn wait_for(s: &TestServer, c: &reqwest::Client, series: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = s.metrics(c).await;
        if metric(&m, series) == want {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached {want}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_is_503_with_retry_after() {
    let s = server(Opts {
        limits: Limits {
            queue_capacity: 1,
            ..Limits::default()
        },
        delay: Some(Duration::from_millis(20)),
        eos: false,
    })
    .await;
    let c = client();
    // A: running (its headers arrive once the worker has started it).
    let a = post(
        &c,
        &s.url("/completion"),
        json!({"prompt": [1, 2], "n_predict": 200, "stream": true}),
    )
    .await;
    assert_eq!(a.status(), 200);
    // B: waits in the queue.
    let (c2, url) = (c.clone(), s.url("/completion"));
    let b = tokio::spawn(async move {
        post(
            &c2,
            &url,
            json!({"prompt": [3], "n_predict": 2, "temperature": 0}),
        )
        .await
    });
    wait_for(&s, &c, "equicrypt_queue_depth", 1.0).await;
    // C: refused.
    let r = post(
        &c,
        &s.url("/completion"),
        json!({"prompt": [4], "n_predict": 2}),
    )
    .await;
    assert_eq!(r.headers()["retry-after"], "1");
    assert_error(r, 503, "server_busy").await;
    let r = post(
        &c,
        &s.url("/v1/completions"),
        json!({"prompt": [4], "max_tokens": 2}),
    )
    .await;
    assert_error(r, 503, "server_busy").await;
    let m = s.metrics(&c).await;
    assert_eq!(
        metric(&m, "equicrypt_rejected_total{reason=\"queue_full\"}"),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "equicrypt_requests_total{endpoint=\"completion\",status=\"503\"}"
        ),
        1.0
    );
    // Dropping A frees the worker; B then runs.
    drop(a);
    let b = b.await.unwrap();
    assert_eq!(b.status(), 200);
    let b: CompletionResponse = b.json().await.unwrap();
    assert_eq!(b.tokens.len(), 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_cancels_the_job() {
    let s = server(Opts {
        delay: Some(Duration::from_millis(25)),
        eos: false,
        ..Opts::default()
    })
    .await;
    let c = client();
    let r = post(
        &c,
        &s.url("/completion"),
        json!({"prompt": [1, 2, 3], "n_predict": 200, "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut seen = String::new();
    while seen.matches("\n\n").count() < 2 {
        let chunk = body.next().await.unwrap().unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    drop(body); // the client goes away after two tokens
    let m = wait_for(&s, &c, "equicrypt_jobs_cancelled_total", 1.0).await;
    let generated = metric(&m, "equicrypt_tokens_generated_total");
    assert!(
        generated < 50.0,
        "job ran on after the disconnect: {generated} tokens"
    );
    assert_eq!(metric(&m, "equicrypt_jobs_completed_total"), 0.0);
    assert_eq!(metric(&m, "equicrypt_jobs_running"), 0.0);

    // A non-streaming request whose client gives up is cancelled too.
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = quick
        .post(s.url("/completion"))
        .json(&json!({"prompt": [1], "n_predict": 200}))
        .send()
        .await;
    assert!(r.is_err(), "expected a client timeout");
    let m = wait_for(&s, &c, "equicrypt_jobs_cancelled_total", 2.0).await;
    assert!(metric(&m, "equicrypt_tokens_generated_total") < 100.0);
    // The worker is free again.
    let r = post(
        &c,
        &s.url("/completion"),
        json!({"prompt": [1], "n_predict": 2}),
    )
    .await;
    assert_eq!(r.status(), 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_streams_and_refuses_queued() {
    let mut s = server(Opts {
        delay: Some(Duration::from_millis(20)),
        eos: false,
        ..Opts::default()
    })
    .await;
    let c = client();
    let a = post(
        &c,
        &s.url("/completion"),
        json!({"prompt": [1, 2], "n_predict": 30, "stream": true}),
    )
    .await;
    assert_eq!(a.status(), 200);
    let (c2, url) = (c.clone(), s.url("/completion"));
    let b =
        tokio::spawn(async move { post(&c2, &url, json!({"prompt": [3], "n_predict": 2})).await });
    wait_for(&s, &c, "equicrypt_queue_depth", 1.0).await;
    let handle = s.trigger_shutdown();
    // The running stream ends normally with its final chunk.
    let chunks: Vec<CompletionResponse> = sse_data(&a.text().await.unwrap())
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let last = chunks.last().unwrap();
    assert!(last.stop);
    assert_eq!(last.stop_type, StopType::Limit);
    assert_eq!(last.tokens_predicted, 30);
    // The queued one is refused.
    assert_error(b.await.unwrap(), 503, "shutting_down").await;
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("server did not stop")
        .unwrap()
        .unwrap();
    // Nothing listens any more.
    assert!(c.get(s.url("/health")).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_hold_no_token_ids_or_bodies() {
    let logs = logs();
    let s = start(Opts::default()).await;
    let c = client();
    let prompt = [91u32, 17, 53, 88, 29, 64, 71];
    let r: CompletionResponse = post(
        &c,
        &s.url("/completion"),
        json!({"prompt": prompt, "n_predict": 8, "temperature": 0}),
    )
    .await
    .json()
    .await
    .unwrap();
    let _ = stream_completion(
        &c,
        &s,
        json!({"prompt": prompt, "n_predict": 8, "temperature": 0, "stream": true, "n_probs": 3}),
    )
    .await;
    let _ = post(
        &c,
        &s.url("/v1/completions"),
        json!({"prompt": prompt, "max_tokens": 8}),
    )
    .await;
    let _ = post(&c, &s.url("/completion"), json!({"prompt": [91, 17, 96]})).await;
    let _ = post(
        &c,
        &s.url("/completion"),
        json!({"prompt": prompt, "secret_field": 1}),
    )
    .await;
    s.stop().await;
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(text.contains("request"), "nothing was logged");
    assert!(text.contains("job done"));
    let joined = |ids: &[u32], sep: &str| {
        ids.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(sep)
    };
    for needle in [
        joined(&prompt[..3], ", "),
        joined(&prompt[..3], ","),
        joined(&prompt[..3], " "),
        "secret_field".to_string(),
        "\"prompt\"".to_string(),
        "prompt\":".to_string(),
    ] {
        assert!(!text.contains(&needle), "log contains {needle:?}:\n{text}");
    }
    if r.tokens.len() >= 3 {
        assert!(!text.contains(&joined(&r.tokens[..3], ", ")));
        assert!(!text.contains(&joined(&r.tokens[..3], ",")));
    }
    // No list of numbers at all.
    let b = text.as_bytes();
    assert!(
        !b.windows(2).any(|w| w[0] == b'[' && w[1].is_ascii_digit()),
        "log contains a number list:\n{text}"
    );
    std::io::stderr().flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_listen_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_encrypted(dir.path());
    let cfg = equicrypt_server::ServerConfig::new(&model, "0.0.0.0:0".parse().unwrap());
    let err = equicrypt_server::serve(cfg, async {}).await.unwrap_err();
    assert!(
        matches!(err, equicrypt_server::ServerError::RemoteListen(_)),
        "{err}"
    );
    assert!(err.to_string().contains("--allow-remote"));
    // Loopback is fine (and a completed shutdown future stops it at once).
    let cfg = equicrypt_server::ServerConfig::new(&model, "127.0.0.1:0".parse().unwrap());
    equicrypt_server::serve(cfg, async {}).await.unwrap();
}
