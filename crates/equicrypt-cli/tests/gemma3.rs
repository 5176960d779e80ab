//! Gemma 3 270M (Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0, F32) end to end with the built binary: stock
//! llama.cpp runs the encrypted file bit-identically, and the blind server, `chat`, the OpenAI
//! proxy and a real `llama-server` answer exactly as the plaintext model does.
//!
//! The model is `equicrypt fetch-model gemma3` (`EQUICRYPT_GEMMA3_GGUF` or `models/gemma3/`); it
//! is a base model without chat tuning, so its answers are poor: equivalence is the point. The
//! chat prompt is one whose greedy margin is wide (≥ 1.47 logits over 16 tokens, checked first),
//! so a cross-engine comparison cannot flip on a near-tie. SKIP unless the model (and, for the
//! llama.cpp tests, llama-cpp-python / llama-server) is present or `EQUICRYPT_REQUIRE_*=1`.

#![allow(clippy::await_holding_lock)]

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use equicrypt_client::ChatMessage;
use equicrypt_test_support::{
    assert_margin, chat_margin, gemma3, heavy_lock, llama_cpp_python, llama_server, raw_http,
    ChildGuard, Margin,
};
use serde_json::{json, Value};
use support::{Fixture, Proc};

/// The chat prompt (Gemma's built-in template): greedy margin ≥ 1.47 over 16 tokens.
const USER: &str = "Continue the sequence: 1, 2, 3, 4, 5,";
const GEN: usize = 16;

fn reference(plain: &std::path::Path) -> Margin {
    let m = chat_margin(plain, &[ChatMessage::new("user", USER)], GEN);
    assert_margin(&m, "Gemma 3 chat prompt");
    m
}

/// Runs `equicrypt chat` with the prompt on stdin; returns stdout.
fn chat(fx: &Fixture, server: &str, extra: &[&str]) -> String {
    let gen = GEN.to_string();
    let mut args = vec!["--max-tokens", gen.as_str()];
    args.extend_from_slice(extra);
    support::run_chat(
        &fx.key_path,
        &fx.plain,
        server,
        &args,
        &format!("{USER}\n/quit\n"),
    )
    .0
}

#[test]
fn gemma3_stock_file_is_bit_identical_in_stock_llamacpp() {
    let test = "gemma3_stock_file_is_bit_identical_in_stock_llamacpp";
    let Some(plain) = gemma3(test) else {
        return;
    };
    if !llama_cpp_python(test) {
        return;
    }
    let _heavy = heavy_lock();
    let fx = Fixture::new(&plain); // default mode: stock
    let (stdout, r) = support::verify_short_job(
        fx.dir.path(),
        &[
            "--key".as_ref(),
            fx.key_path.as_os_str(),
            "--plain".as_ref(),
            plain.as_os_str(),
            "--encrypted".as_ref(),
            fx.enc.as_os_str(),
            "--engine".as_ref(),
            "llamacpp".as_ref(),
        ],
        &[],
    );
    let l = &r["logits"];
    assert!(l["tokens"].as_u64().unwrap() > 150, "{r}");
    assert_eq!(l["bit_identical_rows"], l["tokens"], "{r}");
    assert_eq!(r["generation"]["identical"], 3, "{r}");
    assert_eq!(r["promised"], "bit-identical logits", "{r}");
    println!("{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_blind_server_chat_and_proxy_answer_as_the_plain_model() {
    let test = "gemma3_blind_server_chat_and_proxy_answer_as_the_plain_model";
    let Some(plain) = gemma3(test) else {
        return;
    };
    let _heavy = heavy_lock();
    let expect = reference(&plain);
    let expect = expect.text.trim().to_string();
    assert!(!expect.is_empty());
    let fx = Fixture::new(&plain);
    let (_server, addr) = Proc::serve(&fx.enc);
    let out = chat(&fx, &format!("http://{addr}"), &[]);
    assert!(out.starts_with(&expect), "expected {expect:?} in:\n{out}");

    let (_proxy, paddr) = Proc::proxy(&fx.key_path, &plain, addr);
    let req = json!({
        "messages": [{"role": "user", "content": USER}],
        "max_tokens": GEN,
        "temperature": 0,
    });
    let (code, body) = raw_http(
        paddr,
        "POST",
        "/v1/chat/completions",
        Some(&req.to_string()),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.trim(), expect, "{body}");
    println!("blind server, chat and proxy answered {expect:?}");
}

#[test]
fn gemma3_chat_through_real_llama_server_answers_as_the_plain_model() {
    let test = "gemma3_chat_through_real_llama_server_answers_as_the_plain_model";
    let Some(plain) = gemma3(test) else {
        return;
    };
    let Some(bin) = llama_server(test) else {
        return;
    };
    let _heavy = heavy_lock();
    let expect = reference(&plain);
    let expect = expect.text.trim().to_string();
    let fx = Fixture::new(&plain);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = fx.dir.path().join("llama-server.log");
    let logf = std::fs::File::create(&log).unwrap();
    let mut server = ChildGuard(
        Command::new(bin)
            .arg("-m")
            .arg(&fx.enc)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-t", "1", "-tb", "1", "-c", "1024", "-np", "1"])
            .args(["--alias", &fx.key.fingerprint().0])
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap(),
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(s)) = server.try_wait() {
            panic!(
                "llama-server exited with {s}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if matches!(raw_http(addr, "GET", "/health", None), Ok((200, _))) {
            break;
        }
        assert!(Instant::now() < deadline, "llama-server not healthy");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = chat(&fx, &format!("http://{addr}"), &["--backend", "llamacpp"]);
    assert!(out.starts_with(&expect), "expected {expect:?} in:\n{out}");
    println!("llama-server answered {expect:?}");
}
