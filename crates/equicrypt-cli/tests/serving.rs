//! Blind serving end to end with the real model: `equicrypt serve` as a child process, the client
//! library (`RemoteClient`, `BlindChat`) and `equicrypt chat` on this side.
//!
//! * greedy answers through the server equal plaintext generation in-process, token for token;
//! * the wire (recorded by a TCP relay, both directions) and the server's stdout/stderr hold no
//!   prompt or answer text and no key, but do hold the ciphertext ids;
//! * a client whose key does not match the served model stops before sending a prompt;
//! * `equicrypt chat` answers a question and prints the ciphertext ids on request.
//!
//! Needs SmolLM2 (`EQUICRYPT_SMOLLM2` or `models/smollm2/…`); prints SKIP without it unless
//! `EQUICRYPT_REQUIRE_MODELS=1`.

// Each test holds `support::heavy_lock()` for its whole run (also across awaits, on the test's
// own runtime) so that two model runs never share the two CI cores.
#![allow(clippy::await_holding_lock)]

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use equicrypt_client::remote::{Backend, BlindChat, GenerateParams, RemoteClient};
use equicrypt_client::{ChatMessage, ClientError};
use equicrypt_engine::{generate, Engine, LlamaModel, SamplingParams};
use equicrypt_test_support::{assert_margin, chat_margin, wide_margin_chat, WIDE_MARGIN_USER};
use support::{Fixture, Proc, Relay, FRANCE};

/// The 20 built-in chat prompts of `equicrypt verify`.
const PROMPTS: &str = include_str!("../data/prompts.txt");

/// New tokens per prompt in the equivalence test (CI time; `verify` uses 32).
const GEN_TOKENS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_greedy_answers_equal_plaintext_generation_on_20_prompts() {
    let test = "blind_greedy_answers_equal_plaintext_generation_on_20_prompts";
    let Some(plain) = support::smollm2(test) else {
        return;
    };
    let _heavy = support::heavy_lock();
    let t0 = Instant::now();
    let fx = Fixture::new(&plain);
    let (session, template) = fx.client_side();
    let tok = session.tokenizer().clone();
    let prompts: Vec<&str> = PROMPTS.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(prompts.len(), 20);
    let texts: Vec<String> = prompts
        .iter()
        .map(|p| {
            template
                .render(&[ChatMessage::new("user", *p)], true)
                .unwrap()
        })
        .collect();
    let plain_prompts: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t, true).unwrap()).collect();

    let (_server, addr) = Proc::serve(&fx.enc);

    // The plaintext reference runs in-process on its own thread, next to the server (one core each).
    let reference = {
        let plain = plain.clone();
        let plain_prompts = plain_prompts.clone();
        let stop = tok.eog_ids().to_vec();
        std::thread::spawn(move || {
            let mut model = LlamaModel::load(&plain).unwrap();
            plain_prompts
                .iter()
                .map(|ids| {
                    model.reset();
                    generate(
                        &mut model,
                        ids,
                        GEN_TOKENS,
                        &SamplingParams::greedy(),
                        &stop,
                        |_| true,
                    )
                    .unwrap()
                    .tokens
                })
                .collect::<Vec<Vec<u32>>>()
        })
    };

    let client = RemoteClient::new(&format!("http://{addr}"), Backend::Equicrypt).unwrap();
    let info = client
        .check_fingerprint(&fx.key.fingerprint())
        .await
        .unwrap();
    assert_eq!(info.vocab_size, tok.vocab_size());
    let blind = BlindChat::new(&session, &client);
    let mut outputs = Vec::new();
    for text in &texts {
        let out = blind
            .generate(text, GenerateParams::greedy(GEN_TOKENS), |_, _| {})
            .await
            .unwrap();
        outputs.push(out);
    }
    let blind_s = t0.elapsed().as_secs_f64();
    let reference = reference.join().unwrap();

    let mut tokens = 0;
    for (k, (out, want)) in outputs.iter().zip(&reference).enumerate() {
        let expected_cipher = session.encrypt_ids(&plain_prompts[k]).unwrap();
        assert_eq!(
            out.prompt_cipher_ids, expected_cipher,
            "prompt {k}: the server was not sent the encrypted plaintext ids"
        );
        assert_ne!(out.prompt_cipher_ids, plain_prompts[k], "prompt {k}");
        assert_eq!(
            &out.plain_ids,
            want,
            "prompt {k} ({:?}): blind answer {:?} != plaintext answer {:?}",
            prompts[k],
            out.text,
            tok.decode(want)
        );
        assert_eq!(session.decrypt_ids(&out.cipher_ids).unwrap(), *want);
        assert_eq!(out.text, tok.decode(want).unwrap(), "prompt {k}");
        tokens += want.len();
    }
    println!(
        "{} prompts, {tokens} generated tokens identical (plaintext in-process vs blind server); \
         first answer: {:?}; blind side done at {blind_s:.1} s, reference at {:.1} s",
        outputs.len(),
        outputs[0].text,
        t0.elapsed().as_secs_f64()
    );
}

/// Protocol vocabulary (JSON field names, HTTP headers, log fields, the served model's name): a
/// prompt or answer word that is one of these would be found on the wire without being a leak.
const PROTOCOL_WORDS: &[&str] = &[
    "accept",
    "application",
    "cache",
    "chunked",
    "close",
    "completion",
    "connection",
    "content",
    "context",
    "control",
    "encoding",
    "encryption",
    "endpoint",
    "equicrypt",
    "evaluated",
    "event",
    "exact",
    "false",
    "fingerprint",
    "generated",
    "health",
    "latency",
    "length",
    "limit",
    "listening",
    "model",
    "models",
    "object",
    "owned",
    "penalty",
    "predict",
    "predicted",
    "probabilities",
    "prompt",
    "queue",
    "repeat",
    "request",
    "return",
    "second",
    "shutting",
    "status",
    "stopped",
    "stream",
    "timings",
    "tokens",
    "transfer",
    "vocab",
    "worker",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_and_server_logs_hold_no_plaintext_and_no_key() {
    let test = "wire_and_server_logs_hold_no_plaintext_and_no_key";
    let Some(plain) = support::smollm2(test) else {
        return;
    };
    let _heavy = support::heavy_lock();
    let fx = Fixture::new(&plain);
    let (session, template) = fx.client_side();
    let (mut server, addr) = Proc::serve(&fx.enc);
    let relay = Relay::start(addr).await;
    let client = RemoteClient::new(&relay.url(), Backend::Equicrypt).unwrap();
    client
        .check_fingerprint(&fx.key.fingerprint())
        .await
        .unwrap();
    let blind = BlindChat::new(&session, &client);

    // The first chat has a wide greedy margin, so its (checked) answer is a sensible sentence
    // on every CPU kind.
    let user = |p: &str| vec![ChatMessage::new("user", p)];
    let chats = [
        wide_margin_chat(),
        user("Write a haiku about the ocean."),
        user("Name three planets in our solar system."),
    ];
    let expect = chat_margin(&plain, &chats[0], 32);
    assert_margin(&expect, "wire test's first chat");
    let mut plaintexts: Vec<String> = Vec::new();
    let mut all_cipher_out: Vec<u32> = Vec::new();
    let mut prompt_ciphers = Vec::new();
    for msgs in &chats {
        let p = msgs.last().unwrap().content.as_str();
        let text = template.render(msgs, true).unwrap();
        let out = blind
            .generate(&text, GenerateParams::greedy(32), |_, _| {})
            .await
            .unwrap();
        println!("{p:?} -> {:?}", out.text);
        assert!(!out.text.trim().is_empty());
        plaintexts.push(p.to_string());
        plaintexts.push(out.text.trim().to_string());
        all_cipher_out.extend_from_slice(&out.cipher_ids);
        prompt_ciphers.push(out.prompt_cipher_ids);
    }
    assert_eq!(plaintexts[0], WIDE_MARGIN_USER);
    assert_eq!(
        plaintexts[1],
        expect.text.trim(),
        "differs from the in-process answer"
    );
    let status = server.terminate();
    assert!(status.success(), "serve exited with {status}");

    let up = relay.rec.up_text();
    let down = relay.rec.down_text();
    let logs = format!("{}\n{}", server.stdout_text(), server.stderr_text());
    assert!(up.contains("POST /completion"), "{up}");
    assert!(logs.contains("job done"), "{logs}");
    let haystacks = [
        ("client->server traffic", up.to_ascii_lowercase()),
        ("server->client traffic", down.to_ascii_lowercase()),
        ("server stdout/stderr", logs.to_ascii_lowercase()),
    ];

    // The relay saw the ciphertext ids: every prompt as sent, and the streamed answers.
    for c in &prompt_ciphers {
        let list = support::json_ids(c);
        assert!(
            up.contains(&format!("\"prompt\":{list}")),
            "prompt {list} not on the wire"
        );
    }
    let eog = session.eog_cipher_ids().unwrap();
    let streamed: Vec<u32> = token_arrays(&down)
        .into_iter()
        .flatten()
        .filter(|id| !eog.contains(id))
        .collect();
    assert_eq!(
        streamed, all_cipher_out,
        "streamed ids differ from the answers"
    );

    // No prompt, no answer, no word of ≥ 5 letters from them.
    let mut checked = 0;
    let mut skipped = Vec::new();
    for text in &plaintexts {
        for (what, hay) in &haystacks {
            assert!(
                !hay.contains(&text.to_ascii_lowercase()),
                "{what} contains the plaintext {text:?}"
            );
        }
        for w in support::words(text, 5) {
            if PROTOCOL_WORDS.contains(&w.as_str()) {
                skipped.push(w);
                continue;
            }
            checked += 1;
            for (what, hay) in &haystacks {
                assert!(
                    !hay.contains(&w),
                    "{what} contains the word {w:?} (from {text:?})"
                );
            }
        }
    }
    // And never the key.
    let hex = support::key_hex(&fx.key_path);
    for (what, hay) in &haystacks {
        assert!(!hay.contains(&hex), "{what} contains the secret key");
        for part in hex.as_bytes().chunks(16) {
            let part = std::str::from_utf8(part).unwrap();
            assert!(
                !hay.contains(part),
                "{what} contains part of the secret key"
            );
        }
    }
    println!(
        "{} bytes up, {} bytes down, {} log bytes: {checked} words checked, none found \
         (protocol words skipped: {skipped:?})",
        up.len(),
        down.len(),
        logs.len()
    );
}

/// Every `"tokens":[…]` array in `text`, in order.
fn token_arrays(text: &str) -> Vec<Vec<u32>> {
    let key = "\"tokens\":[";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(key) {
        rest = &rest[i + key.len()..];
        let end = rest.find(']').expect("unterminated tokens array");
        let ids = rest[..end]
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse().unwrap())
            .collect();
        out.push(ids);
        rest = &rest[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_with_another_key_before_any_prompt() {
    let test = "client_refuses_a_server_with_another_key_before_any_prompt";
    let Some(plain) = support::smollm2(test) else {
        return;
    };
    let _heavy = support::heavy_lock();
    let fx = Fixture::new(&plain);
    let key_b_path = fx.dir.path().join("b.key");
    let key_b = support::keygen(&key_b_path);
    assert_ne!(key_b.fingerprint(), fx.key.fingerprint());
    let (_server, addr) = Proc::serve(&fx.enc);
    let relay = Relay::start(addr).await;

    // The library: check_fingerprint fails with a mismatch naming both fingerprints.
    let client = RemoteClient::new(&relay.url(), Backend::Equicrypt).unwrap();
    match client.check_fingerprint(&key_b.fingerprint()).await {
        Err(ClientError::FingerprintMismatch { server, key }) => {
            assert_eq!(server, fx.key.fingerprint().0);
            assert_eq!(key, key_b.fingerprint().0);
        }
        other => panic!("expected a fingerprint mismatch, got {other:?}"),
    }

    // The binary: `equicrypt chat` with key B exits non-zero with one error line, having read no
    // prompt from stdin.
    let mut chat = Command::new(support::BIN)
        .arg("chat")
        .arg("--key")
        .arg(&key_b_path)
        .arg("--tokenizer")
        .arg(&plain)
        .args(["--server", &relay.url()])
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = chat
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{FRANCE}\n/quit\n").as_bytes());
    let o = chat.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "chat accepted another key's server: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("error:") && lines[0].contains(&fx.key.fingerprint().0),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&o.stdout).trim().is_empty());

    // The proxy refuses to start against it.
    let proxy = Command::new(support::BIN)
        .arg("proxy")
        .arg("--key")
        .arg(&key_b_path)
        .arg("--tokenizer")
        .arg(&plain)
        .args(["--server", &relay.url(), "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let perr = String::from_utf8_lossy(&proxy.stderr);
    assert!(!proxy.status.success(), "{perr}");
    assert!(
        perr.starts_with("error:") && perr.contains(&fx.key.fingerprint().0),
        "{perr}"
    );

    let up = relay.rec.up_text();
    assert!(up.contains("GET /v1/models"), "{up}");
    assert!(
        !up.contains("/completion"),
        "a completion request reached the server: {up}"
    );
    println!(
        "mismatch refused: {} requests, all GET /v1/models; chat said: {}",
        up.matches(" HTTP/1.1").count(),
        lines[0]
    );
}

/// Runs `equicrypt chat` against `server` with `input` on stdin.
fn chat(fx: &Fixture, server: &str, extra: &[&str], input: &str) -> (String, String) {
    let mut args = vec!["--max-tokens", "48"];
    args.extend_from_slice(extra);
    support::run_chat(&fx.key_path, &fx.plain, server, &args, input)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_command_answers_through_the_blind_server() {
    let test = "chat_command_answers_through_the_blind_server";
    let Some(plain) = support::smollm2(test) else {
        return;
    };
    let _heavy = support::heavy_lock();
    let fx = Fixture::new(&plain);
    let (session, template) = fx.client_side();
    let (_server, addr) = Proc::serve(&fx.enc);
    let url = format!("http://{addr}");
    let input = format!("{FRANCE}\n/quit\n");

    // The in-process plain answer; `chat` must print the same (whatever it says).
    let expect = chat_margin(&plain, &[ChatMessage::new("user", FRANCE)], 48);
    let expect = expect.text.trim();
    assert!(!expect.is_empty());
    let (out, err) = chat(&fx, &url, &[], &input);
    assert!(out.starts_with(expect), "expected {expect:?} in:\n{out}");
    assert!(!out.contains("[server saw"), "{out}");
    assert!(err.contains(&fx.key.fingerprint().0), "{err}");

    let (out2, _) = chat(&fx, &url, &["--show-ciphertext"], &input);
    assert!(out2.starts_with(expect), "expected {expect:?} in:\n{out2}");
    let text = template
        .render(&[ChatMessage::new("user", FRANCE)], true)
        .unwrap();
    let cipher_prompt = session.encrypt_prompt(&text, true).unwrap();
    let saw = format!(
        "[server saw {} prompt ids: {:?}]",
        cipher_prompt.len(),
        cipher_prompt
    );
    assert!(out2.contains(&saw), "expected {saw} in:\n{out2}");
    let produced = out2
        .lines()
        .find_map(|l| l.strip_prefix("[server produced "))
        .unwrap_or_else(|| panic!("no produced ids in:\n{out2}"));
    let ids: Vec<u32> = produced
        .split_once('[')
        .unwrap()
        .1
        .trim_end_matches(']')
        .split(", ")
        .map(|s| s.parse().unwrap())
        .collect();
    let answer = session.decrypt_text(&ids).unwrap();
    assert_eq!(answer.trim(), expect, "{answer}");
    assert!(out2.starts_with(answer.trim()), "{out2}");
    println!("chat answered {:?}; server produced {ids:?}", answer.trim());
}
