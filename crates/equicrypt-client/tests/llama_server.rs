//! Blind chat against a REAL llama.cpp `llama-server` serving an encrypted SmolLM2-135M-Instruct.
//!
//! The binary comes from `scripts/build-llamacpp.sh`: `$EQUICRYPT_LLAMA_SERVER`, else the newest
//! `${EQUICRYPT_CACHE_DIR:-/work/cache}/llamacpp-*/server/bin/llama-server`. When it is absent
//! the test prints `SKIP` — or fails if `EQUICRYPT_REQUIRE_LLAMA_SERVER=1`. The model follows the
//! other tests' rules (`EQUICRYPT_SMOLLM2`, `EQUICRYPT_REQUIRE_MODELS=1`); see
//! `equicrypt-test-support`.
//!
//! The answers are compared with the plain model's greedy answer in our own engine, never with a
//! particular text; the prompt is one whose greedy margin (top-1 − top-2 logit at every step) is
//! large, checked first, so the answer cannot flip between CPU kinds or engines.
//!
//! `-t 1 -tb 1` because the test machines have two shared cores and ggml's threads spin-wait.
//! (The portable build has no AMX, whose repack path once needed `--no-repack`.)

use equicrypt_test_support::{
    assert_margin, chat_margin, llama_server, smollm2, wide_margin_chat, ChildGuard, Margin,
};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::Content;
use equicrypt_client::remote::{
    Backend, BlindChat, CompletionRequest, GenerateParams, RemoteClient, StopType, StreamEvent,
};
use equicrypt_client::{ChatTemplate, CipherSession, ClientError, GgufTokenizer};
use equicrypt_core::{SecretKey, VocabPermutation};
use equicrypt_model::{encrypt_gguf, EncryptOptions};

/// The plain model's greedy answer to [`wide_margin_chat`] in our engine; panics when its margin
/// is too small for a cross-engine comparison.
fn reference(plain: &Path) -> Margin {
    let m = chat_margin(plain, &wide_margin_chat(), 48);
    assert_margin(&m, "llama-server chat prompt");
    assert!(
        m.stopped,
        "the reference answer does not end at EOS: {:?}",
        m.text
    );
    m
}

/// `m`'s answer without its stop token.
fn answer_ids(m: &Margin) -> &[u32] {
    &m.tokens[..m.tokens.len() - 1]
}

/// The running server (killed when dropped, also while a failed assertion unwinds) and its log.
struct ServerGuard {
    child: ChildGuard,
    log: PathBuf,
}

impl ServerGuard {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().unwrap().port()
}

/// Starts llama-server on a free loopback port and waits for `/health`; retries on a port race.
async fn start_server(
    bin: &Path,
    model: &Path,
    alias: &str,
    dir: &Path,
) -> (ServerGuard, RemoteClient) {
    let mut last = String::new();
    for attempt in 0..3 {
        let port = free_port();
        let log = dir.join(format!("llama-server-{attempt}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-t", "1", "-tb", "1", "-c", "1024", "-np", "1"])
            .args(["--alias", alias])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn llama-server");
        let mut guard = ServerGuard {
            child: ChildGuard(child),
            log,
        };
        let client =
            RemoteClient::new(&format!("http://127.0.0.1:{port}"), Backend::LlamaCpp).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(status)) = guard.child.try_wait() {
                last = format!("llama-server exited with {status}:\n{}", guard.log_tail());
                break;
            }
            match client.health().await {
                Ok(()) => return (guard, client),
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "llama-server not healthy after 120 s: {e}\n{}",
                        guard.log_tail()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    panic!("llama-server did not start: {last}");
}

#[tokio::test]
async fn blind_chat_against_real_llama_server() {
    let test = "blind_chat_against_real_llama_server";
    let Some(plain) = smollm2(test) else {
        return;
    };
    let Some(bin) = llama_server(test) else {
        return;
    };

    // Client side: key, tokenizer and template from the plaintext GGUF.
    let key = SecretKey::from_bytes([0x5a; 32]);
    let fp = key.fingerprint();
    let content = {
        let mut f = std::fs::File::open(&plain).unwrap();
        Content::read(&mut f).unwrap()
    };
    let session = CipherSession::from_key(GgufTokenizer::from_content(&content).unwrap(), &key);
    let prompt = ChatTemplate::from_content(&content)
        .unwrap()
        .render(&wide_margin_chat(), true)
        .unwrap();

    // Server side: the encrypted file, served by stock llama-server.
    let dir = tempfile::tempdir().unwrap();
    let enc = dir.path().join("enc.gguf");
    encrypt_gguf(&key, &plain, &enc, &EncryptOptions::default()).unwrap();
    let t0 = Instant::now();
    let (guard, client) = start_server(&bin, &enc, &format!("equicrypt-{fp}"), dir.path()).await;
    let startup = t0.elapsed();

    // The key check passes for this key and refuses another one.
    let info = client.check_fingerprint(&fp).await.unwrap();
    assert_eq!(info.key_fingerprint.as_deref(), Some(fp.0.as_str()));
    assert_eq!(info.vocab_size, session.tokenizer().vocab_size());
    let other = SecretKey::from_bytes([0x5b; 32]).fingerprint();
    assert!(matches!(
        client.check_fingerprint(&other).await,
        Err(ClientError::FingerprintMismatch { .. })
    ));

    // Greedy blind chat, streamed.
    let chat = BlindChat::new(&session, &client);
    let mut pieces = String::new();
    let mut piece_ids = Vec::new();
    let t1 = Instant::now();
    let out = chat
        .generate(&prompt, GenerateParams::greedy(48), |text, ids| {
            pieces.push_str(text);
            piece_ids.extend_from_slice(ids);
        })
        .await
        .unwrap_or_else(|e| panic!("generate: {e}\n{}", guard.log_tail()));
    let gen_time = t1.elapsed();
    eprintln!(
        "llama-server: healthy after {:.2} s; answer in {:.2} s ({} tokens, stop {:?}, server {:.1} tok/s): {:?}",
        startup.as_secs_f64(),
        gen_time.as_secs_f64(),
        out.cipher_ids.len(),
        out.stop_type,
        out.timings.as_ref().map_or(0.0, |t| t.predicted_per_second),
        out.text
    );
    eprintln!("  prompt (cipher): {:?}...", &out.prompt_cipher_ids[..8]);
    eprintln!("  answer (cipher): {:?}", out.cipher_ids);
    // The same answer as the plain model in our engine (no particular text is expected).
    let expect = reference(&plain);
    assert_eq!(out.plain_ids, answer_ids(&expect), "answer: {:?}", out.text);
    assert_eq!(out.text, expect.text);
    assert_eq!(out.stop_type, StopType::Eos, "SmolLM2 ends its sentence");
    // llama-server's final event (timings) is read after its EOS, not cut off.
    let timings = out
        .timings
        .as_ref()
        .expect("timings of llama-server's final event");
    assert_eq!(timings.prompt_n, out.prompt_cipher_ids.len());
    assert_eq!(pieces, out.text);
    assert_eq!(piece_ids, out.cipher_ids);
    assert_eq!(session.decrypt_ids(&out.cipher_ids).unwrap(), out.plain_ids);
    // What the server saw is not the plaintext.
    let plain_prompt = session.tokenizer().encode(&prompt, true).unwrap();
    assert_eq!(
        session.encrypt_ids(&plain_prompt).unwrap(),
        out.prompt_cipher_ids
    );
    assert_ne!(plain_prompt, out.prompt_cipher_ids);

    // Non-streamed greedy completion gives the same ids.
    let eog = session.eog_cipher_ids().unwrap();
    let mut req: CompletionRequest = serde_json::from_value(serde_json::json!({
        "prompt": out.prompt_cipher_ids,
        "n_predict": 48,
        "temperature": 0.0,
        "top_k": 1,
        "stop_ids": eog,
    }))
    .unwrap();
    let r = client.complete(&req).await.unwrap();
    assert_eq!(r.tokens, out.cipher_ids);
    assert_eq!(r.stop_type, StopType::Eos);

    // The client stops a llama-server stream itself at a stop id llama-server does not know.
    let stop = out.cipher_ids[3];
    let cut = out.cipher_ids.iter().position(|&t| t == stop).unwrap();
    req.stop_ids = vec![stop];
    let mut ts = client.complete_stream(&req).await.unwrap();
    let mut got = Vec::new();
    let mut done = None;
    while let Some(ev) = ts.next().await.unwrap() {
        match ev {
            StreamEvent::Tokens(t) => got.extend(t),
            d @ StreamEvent::Done { .. } => done = Some(d),
        }
    }
    assert_eq!(got, out.cipher_ids[..cut]);
    assert!(matches!(
        done,
        Some(StreamEvent::Done {
            stop_type: StopType::Eos,
            ..
        })
    ));

    // llama-server's own errors come back as Server errors.
    req.prompt = vec![u32::MAX - 1];
    let e = client.complete(&req).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Server { status: 400, .. }),
        "{e:?}"
    );

    // Once the server is gone, the client says so.
    drop(guard);
    let fresh = RemoteClient::new(client.base_url(), Backend::LlamaCpp).unwrap();
    let e = fresh.health().await.unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
}

/// `GET path` on a loopback server, HTTP/1.0; the body.
fn http_get(base_url: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let addr = base_url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// With `encrypt --hide-special-ids` the file names no EOS, and llama.cpp then takes id 2 for
/// one. That id is an ordinary ciphertext token: llama-server stops at it (and `ignore_eos`
/// would ban it). The client lets it stop there and continues, so the answer is the one the
/// normal file gives. The key is picked so that the answer contains ciphertext id 2.
#[tokio::test]
async fn hidden_special_ids_on_llama_server_give_the_same_answer() {
    let test = "hidden_special_ids_on_llama_server_give_the_same_answer";
    let Some(plain) = smollm2(test) else {
        return;
    };
    let Some(bin) = llama_server(test) else {
        return;
    };
    let content = {
        let mut f = std::fs::File::open(&plain).unwrap();
        Content::read(&mut f).unwrap()
    };
    let tok = GgufTokenizer::from_content(&content).unwrap();
    let prompt = ChatTemplate::from_content(&content)
        .unwrap()
        .render(&wide_margin_chat(), true)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    // The reference: greedy answer from the normal encrypted file (stop ids sent).
    let key_a = SecretKey::from_bytes([0x5a; 32]);
    let session_a = CipherSession::from_key(tok.clone(), &key_a);
    let normal = dir.path().join("normal.gguf");
    encrypt_gguf(&key_a, &plain, &normal, &EncryptOptions::default()).unwrap();
    let reference = {
        let fp = key_a.fingerprint();
        let (guard, client) = start_server(&bin, &normal, &fp.0, dir.path()).await;
        client.check_fingerprint(&fp).await.unwrap();
        BlindChat::new(&session_a, &client)
            .generate(&prompt, GenerateParams::greedy(48), |_, _| {})
            .await
            .unwrap_or_else(|e| panic!("generate: {e}\n{}", guard.log_tail()))
    };
    assert_eq!(reference.stop_type, StopType::Eos);
    let expect = self::reference(&plain);
    assert_eq!(
        reference.plain_ids,
        answer_ids(&expect),
        "{:?}",
        reference.text
    );
    assert!(reference.plain_ids.len() > 1, "{:?}", reference.text);

    // A key under which some answer token (not the first) is ciphertext id 2.
    const LLAMA_DEFAULT_EOS: u32 = 2;
    let vocab = tok.vocab_size();
    let (key, at) = (0u32..)
        .find_map(|n| {
            let mut b = [0x77; 32];
            b[..4].copy_from_slice(&n.to_le_bytes());
            let key = SecretKey::from_bytes(b);
            let perm = VocabPermutation::derive(&key, vocab);
            let at = reference.plain_ids[1..]
                .iter()
                .position(|&t| perm.encrypt_id(t).unwrap() == LLAMA_DEFAULT_EOS)?;
            Some((key, at + 1))
        })
        .unwrap();
    let hidden = dir.path().join("hidden.gguf");
    let opts = EncryptOptions {
        hide_special_ids: true,
        ..Default::default()
    };
    encrypt_gguf(&key, &plain, &hidden, &opts).unwrap();
    let session = CipherSession::from_key(tok, &key);
    let fp = key.fingerprint();
    let (guard, client) = start_server(&bin, &hidden, &fp.0, dir.path()).await;
    client.check_fingerprint(&fp).await.unwrap();
    let props = http_get(client.base_url(), "/props");
    assert!(
        props.contains(&format!("\"eos_token\":\"<ct{LLAMA_DEFAULT_EOS}>\"")),
        "llama.cpp no longer defaults to EOS id {LLAMA_DEFAULT_EOS}: {props}"
    );

    let params = GenerateParams {
        hide_stop_ids: true,
        ..GenerateParams::greedy(48)
    };
    let mut streamed = String::new();
    let out = BlindChat::new(&session, &client)
        .generate(&prompt, params, |t, _| streamed.push_str(t))
        .await
        .unwrap_or_else(|e| panic!("generate: {e}\n{}", guard.log_tail()));
    eprintln!(
        "hidden ids: llama-server stopped at ciphertext id {LLAMA_DEFAULT_EOS} (answer token {at}) \
         and the client went on: {:?}",
        out.text
    );
    assert_eq!(out.cipher_ids[at], LLAMA_DEFAULT_EOS);
    assert_eq!(out.plain_ids, reference.plain_ids);
    assert_eq!(out.text, reference.text);
    assert_eq!(streamed, out.text);
    assert_eq!(out.stop_type, StopType::Eos);
}
