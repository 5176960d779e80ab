//! `equicrypt proxy` (the OpenAI-compatible plaintext front) end to end: `equicrypt serve` and
//! `equicrypt proxy` as child processes, a recording relay between them, and applications that
//! speak OpenAI HTTP: curl (or a raw HTTP request when curl is absent) and the official `openai`
//! Python package (`scripts/openai_proxy_check.py`).
//!
//! Needs SmolLM2 (`EQUICRYPT_SMOLLM2` or `models/smollm2/…`; SKIP without it unless
//! `EQUICRYPT_REQUIRE_MODELS=1`). The `openai` test also needs `python3 -c "import openai"`; SKIP
//! without it unless `EQUICRYPT_REQUIRE_OPENAI=1`.

// Each test holds `support::heavy_lock()` for its whole run (also across awaits, on the test's
// own runtime) so that two model runs never share the two CI cores.
#![allow(clippy::await_holding_lock)]

mod support;

use std::net::SocketAddr;
use std::process::Command;

use equicrypt_test_support::{
    assert_margin, chat_margin, openai_python, wide_margin_chat, WIDE_MARGIN_COMPLETION,
    WIDE_MARGIN_SYSTEM, WIDE_MARGIN_USER,
};
use serde_json::Value;
use support::{Fixture, Proc, Relay};

fn have_curl() -> bool {
    Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One request to the proxy with curl (or a raw HTTP/1.0 request without curl); status and body.
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    if !have_curl() {
        return support::raw_http(addr, method, path, body).unwrap();
    }
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "-N",
        "--noproxy",
        "*",
        "--max-time",
        "300",
        "-X",
        method,
    ])
    .args(["-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let o = c.arg(format!("http://{addr}{path}")).output().unwrap();
    assert!(
        o.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_string())
        .collect()
}

/// Asserts a 400 with an OpenAI-style JSON error whose message contains `needle`.
fn bad_request(addr: SocketAddr, path: &str, body: &str, needle: &str) {
    let (code, text) = http(addr, "POST", path, Some(body));
    assert_eq!(code, 400, "{body} -> {code} {text}");
    let v = json(&text);
    assert_eq!(v["error"]["type"], "invalid_request_error", "{text}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.to_lowercase().contains(needle),
        "{body}: {msg:?} lacks {needle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_speaks_openai_http_and_sends_only_ciphertext() {
    let test = "proxy_speaks_openai_http_and_sends_only_ciphertext";
    let Some(plain) = support::smollm2(test) else {
        return;
    };
    let _heavy = support::heavy_lock();
    let fx = Fixture::new(&plain);
    let (server, server_addr) = Proc::serve(&fx.enc);
    let relay = Relay::start(server_addr).await;
    let (proxy, addr) = Proc::proxy(&fx.key_path, &fx.plain, relay.addr);
    println!(
        "client: {}",
        if have_curl() {
            "curl"
        } else {
            "raw HTTP/1.0 (no curl)"
        }
    );
    let up_before = relay.rec.up.lock().unwrap().len();
    // The chat has a wide greedy margin; its answer must be the plain model's in-process one.
    let expect = chat_margin(&fx.plain, &wide_margin_chat(), 48);
    assert_margin(&expect, "proxy chat");
    let expect = expect.text;

    let checks = tokio::task::spawn_blocking(move || {
        // GET /v1/models: the served model's id.
        let (code, body) = http(addr, "GET", "/v1/models", None);
        assert_eq!(code, 200, "{body}");
        let v = json(&body);
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["id"], "enc", "{body}");
        assert_eq!(v["data"][0]["object"], "model");

        // Non-streamed chat.
        let req = serde_json::json!({
            "model": "enc",
            "messages": [
                {"role": "system", "content": WIDE_MARGIN_SYSTEM},
                {"role": "user", "content": WIDE_MARGIN_USER},
            ],
            "temperature": 0, "max_tokens": 48,
        });
        let (code, body) = http(addr, "POST", "/v1/chat/completions", Some(&req.to_string()));
        assert_eq!(code, 200, "{body}");
        let v = json(&body);
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        let content = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(content.trim(), expect.trim(), "{body}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{body}");
        let u = &v["usage"];
        let (p, c) = (
            u["prompt_tokens"].as_u64().unwrap(),
            u["completion_tokens"].as_u64().unwrap(),
        );
        assert!(p > 10 && c > 0 && c <= 48, "{u}");
        assert_eq!(u["total_tokens"].as_u64().unwrap(), p + c);

        // Streamed chat with a usage chunk: the same greedy answer, in SSE chunks, then [DONE].
        let mut sreq = req.clone();
        sreq["stream"] = true.into();
        sreq["stream_options"] = serde_json::json!({"include_usage": true});
        let (code, body) = http(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(&sreq.to_string()),
        );
        assert_eq!(code, 200, "{body}");
        let data = sse_data(&body);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
        assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
        let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| json(d)).collect();
        assert!(chunks.len() >= 4, "{body}");
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, content, "stream and non-stream answers differ");
        let finishes: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0]["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finishes, vec![&Value::from("stop")], "{body}");
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], serde_json::json!([]), "{body}");
        assert_eq!(last["usage"], v["usage"], "{body}");

        // Text completion with a plaintext prompt, non-streamed and streamed.
        let creq = serde_json::json!({
            "model": "enc", "prompt": WIDE_MARGIN_COMPLETION, "temperature": 0, "max_tokens": 8,
        });
        let (code, body) = http(addr, "POST", "/v1/completions", Some(&creq.to_string()));
        assert_eq!(code, 200, "{body}");
        let cv = json(&body);
        assert_eq!(cv["object"], "text_completion");
        let ctext = cv["choices"][0]["text"].as_str().unwrap().to_string();
        assert!(!ctext.trim().is_empty(), "{body}");
        assert_eq!(cv["usage"]["completion_tokens"], 8, "{body}");
        assert_eq!(cv["choices"][0]["finish_reason"], "length", "{body}");
        let mut csreq = creq.clone();
        csreq["stream"] = true.into();
        let (code, body) = http(addr, "POST", "/v1/completions", Some(&csreq.to_string()));
        assert_eq!(code, 200, "{body}");
        let data = sse_data(&body);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
        let streamed: String = data[..data.len() - 1]
            .iter()
            .map(|d| json(d))
            .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
            .collect();
        assert_eq!(streamed, ctext);

        // Requests the proxy cannot honour: 400 with an OpenAI-style JSON error, nothing sent on.
        let chat = "/v1/chat/completions";
        bad_request(addr, chat, r#"{"messages": []}"#, "messages");
        bad_request(
            addr,
            chat,
            r#"{"messages": [{"role": "user", "content": "hi"}], "n": 2}"#,
            "n = 1",
        );
        bad_request(
            addr,
            chat,
            r#"{"messages": [{"role": "user", "content": "hi"}], "stop": ["\n"]}"#,
            "stop",
        );
        bad_request(addr, chat, r#"{"messages": [{"role": "us"#, "json");
        bad_request(addr, chat, r#"{"prompt": "hi"}"#, "messages");
        bad_request(
            addr,
            chat,
            r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": 7}"#,
            "temperature",
        );
        bad_request(addr, "/v1/completions", r#"{"prompt": ""}"#, "prompt");
        let (code, body) = http(addr, "GET", "/v1/nothing", None);
        assert_eq!(code, 404, "{body}");
        assert_eq!(json(&body)["error"]["type"], "not_found");
        let (code, body) = http(addr, "GET", chat, None);
        assert_eq!(code, 405, "{body}");
        assert!(json(&body)["error"]["message"].is_string(), "{body}");
        (content, ctext)
    })
    .await
    .unwrap();
    println!("chat answer {:?}; completion {:?}", checks.0, checks.1);

    // Between proxy and server only ciphertext ids travelled: 4 completions, no prompt words.
    let up = relay.rec.up_text();
    let down = relay.rec.down_text();
    assert!(up.len() > up_before);
    assert_eq!(up.matches("POST /completion").count(), 4, "{up}");
    for w in support::words(
        &format!(
            "{WIDE_MARGIN_SYSTEM} {WIDE_MARGIN_USER} {} {}",
            checks.0, checks.1
        ),
        5,
    ) {
        let w = w.as_str();
        if ["prompt", "completion"].contains(&w) {
            continue;
        }
        assert!(!up.to_lowercase().contains(w), "{w:?} sent to the server");
        assert!(
            !down.to_lowercase().contains(w),
            "{w:?} came from the server"
        );
    }

    // An application that hangs up mid-stream: the proxy drops its request to the blind server,
    // which cancels the job instead of generating 400 tokens for nobody.
    tokio::task::spawn_blocking(move || hang_up_mid_stream(addr))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let line = loop {
        let err = server.stderr_text();
        if let Some(l) = err
            .lines()
            .find(|l| l.contains("job cancelled (client gone)"))
        {
            break l.to_string();
        }
        assert!(
            !err.contains("generated=400"),
            "the server generated all 400 tokens after the application hung up:\n{err}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the job was not cancelled:\n{err}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    println!("after the hang-up the server logged: {line}");
    drop(proxy);
}

/// Starts a long streamed completion, reads until the first text chunk, and closes the connection.
fn hang_up_mid_stream(addr: SocketAddr) {
    use std::io::{Read, Write};
    let body = serde_json::json!({
        "prompt": "1, 2, 3, 4, 5, 6,", "temperature": 0, "max_tokens": 400, "stream": true,
    })
    .to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"text\":\"") {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    drop(s);
}

#[test]
fn official_openai_python_package_talks_to_the_proxy() {
    let test = "official_openai_python_package_talks_to_the_proxy";
    let Some(plain) = support::smollm2(test) else {
        return;
    };
    if !openai_python(test) {
        return;
    }
    let _heavy = support::heavy_lock();
    let fx = Fixture::new(&plain);
    let (_server, server_addr) = Proc::serve(&fx.enc);
    let (_proxy, addr) = Proc::proxy(&fx.key_path, &fx.plain, server_addr);
    let expect = chat_margin(&fx.plain, &wide_margin_chat(), 48);
    assert_margin(&expect, "openai chat");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/openai_proxy_check.py"
    );
    let o = Command::new("python3")
        .arg(script)
        .arg(format!("http://{addr}"))
        .args([WIDE_MARGIN_USER, WIDE_MARGIN_SYSTEM, WIDE_MARGIN_COMPLETION])
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "openai_proxy_check.py failed:\n{stderr}"
    );
    let v = json(String::from_utf8_lossy(&o.stdout).trim());
    println!("{}", serde_json::to_string_pretty(&v).unwrap());

    assert_eq!(v["models"], serde_json::json!(["enc"]));
    let chat = &v["chat"];
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["role"], "assistant");
    let content = chat["content"].as_str().unwrap();
    assert_eq!(content.trim(), expect.text.trim(), "{chat}");
    assert_eq!(chat["finish_reason"], "stop");
    let u = &chat["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 10, "{u}");
    assert!(u["completion_tokens"].as_u64().unwrap() > 0, "{u}");

    let st = &v["chat_stream"];
    assert_eq!(st["content"], content, "streamed answer differs: {st}");
    assert_eq!(st["roles"], serde_json::json!(["assistant"]), "{st}");
    assert_eq!(st["finish_reason"], "stop");
    assert_eq!(st["usage_chunks"], 1, "{st}");
    assert_eq!(st["usage"], chat["usage"], "{st}");

    let c = &v["completion"];
    assert_eq!(c["object"], "text_completion");
    assert!(!c["text"].as_str().unwrap().trim().is_empty(), "{c}");
    assert_eq!(c["finish_reason"], "length", "{c}");
    assert_eq!(c["usage"]["completion_tokens"], 8, "{c}");
}

#[test]
fn proxy_refuses_a_non_loopback_listen_address_without_allow_remote() {
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("missing.key");
    let tok = d.path().join("missing.gguf");
    let run = |listen: &str, extra: &[&str]| {
        Command::new(support::BIN)
            .arg("proxy")
            .arg("--key")
            .arg(&key)
            .arg("--tokenizer")
            .arg(&tok)
            .args(["--server", "http://127.0.0.1:9", "--listen", listen])
            .args(extra)
            .output()
            .unwrap()
    };
    for listen in ["0.0.0.0:0", "[::]:0", "192.0.2.1:8081"] {
        let o = run(listen, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{listen}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{listen}: {err}");
        assert!(
            lines[0].starts_with("error:")
                && lines[0].contains("non-loopback")
                && lines[0].contains("--allow-remote"),
            "{listen}: {err}"
        );
        assert!(String::from_utf8_lossy(&o.stdout).is_empty());
    }
    // With --allow-remote the address is accepted (and the missing key file is the next error).
    let o = run("0.0.0.0:0", &["--allow-remote"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        !err.contains("non-loopback") && err.contains("key"),
        "{err}"
    );
}
