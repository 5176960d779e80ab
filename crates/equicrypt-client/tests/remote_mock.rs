//! `equicrypt_client::remote` over real HTTP against a scripted loopback server that speaks
//! `equicrypt_protocol` (strictly: requests are parsed with the protocol's `deny_unknown_fields`
//! types), with responses cut into awkward chunks. No model needed.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::tiny_metadata;
use equicrypt_client::remote::{
    Backend, BlindChat, CompletionRequest, CompletionResponse, ErrorBody, GenerateParams,
    ModelInfo, ModelList, RemoteClient, StopType, StreamEvent, Timings,
};
use equicrypt_client::{CipherSession, ClientError, GgufTokenizer};
use equicrypt_core::{KeyFingerprint, SecretKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One scripted answer.
#[derive(Clone)]
struct Reply {
    status: u16,
    content_type: &'static str,
    /// Sent as separate HTTP chunks (chunked transfer encoding), with a pause between them.
    chunks: Vec<Vec<u8>>,
}

impl Reply {
    fn json(status: u16, v: &impl serde::Serialize) -> Self {
        Self {
            status,
            content_type: "application/json",
            chunks: vec![serde_json::to_vec(v).unwrap()],
        }
    }
}

type Handler = dyn Fn(&str, &str, &[u8]) -> Reply + Send + Sync;

/// Requests seen: (method, path, body).
type Log = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

async fn start(handler: Arc<Handler>) -> (String, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log: Log = Arc::default();
    let log2 = log.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let h = handler.clone();
            let log = log2.clone();
            tokio::spawn(async move {
                let _ = serve_one(sock, h, log).await;
            });
        }
    });
    (url, log)
}

async fn serve_one(mut sock: TcpStream, h: Arc<Handler>, log: Log) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let len = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body = buf[head_end..].to_vec();
    log.lock()
        .unwrap()
        .push((method.clone(), path.clone(), body.clone()));
    let r = h(&method, &path, &body);
    let head = format!(
        "HTTP/1.1 {} X\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        r.status, r.content_type
    );
    sock.write_all(head.as_bytes()).await?;
    for c in &r.chunks {
        if c.is_empty() {
            continue;
        }
        sock.write_all(format!("{:x}\r\n", c.len()).as_bytes())
            .await?;
        sock.write_all(c).await?;
        sock.write_all(b"\r\n").await?;
        sock.flush().await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    sock.write_all(b"0\r\n\r\n").await?;
    sock.shutdown().await
}

/// How many requests went to `path`.
fn requests_to(log: &Log, path: &str) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(_, p, _)| p == path)
        .count()
}

fn session() -> CipherSession {
    let tok = GgufTokenizer::from_metadata(&tiny_metadata()).unwrap();
    CipherSession::from_key(tok, &SecretKey::from_bytes([9; 32]))
}

fn fingerprint() -> KeyFingerprint {
    SecretKey::from_bytes([9; 32]).fingerprint()
}

fn models(fp: Option<String>) -> ModelList {
    ModelList {
        object: "list".into(),
        data: vec![ModelInfo {
            id: "tiny".into(),
            object: "model".into(),
            owned_by: "equicrypt".into(),
            key_fingerprint: fp,
            encryption_mode: Some("perm-exact".into()),
            session: None,
            vocab_size: 269,
            context_length: 64,
        }],
    }
}

fn sse(events: &[CompletionResponse]) -> Vec<u8> {
    let mut s = String::from(": hello\n\n");
    for e in events {
        s.push_str("data: ");
        s.push_str(&serde_json::to_string(e).unwrap());
        s.push_str("\n\n");
    }
    s.into_bytes()
}

/// Cuts `bytes` into pieces of `n` bytes (so events, lines and `\n\n` straddle chunks).
fn pieces(bytes: &[u8], n: usize) -> Vec<Vec<u8>> {
    bytes.chunks(n).map(<[u8]>::to_vec).collect()
}

fn event(tokens: Vec<u32>, stop: bool, n: usize) -> CompletionResponse {
    CompletionResponse {
        content: String::new(),
        tokens,
        stop,
        stop_type: if stop { StopType::Eos } else { StopType::None },
        tokens_predicted: n,
        tokens_evaluated: 3,
        completion_probabilities: vec![],
        timings: stop.then(|| Timings {
            prompt_n: 3,
            predicted_n: n,
            ..Timings::default()
        }),
    }
}

#[tokio::test]
async fn blind_chat_streams_and_decrypts_over_http() {
    let s = session();
    // The "model" answers "héllo the 12" (é is two byte tokens: UTF-8 must be buffered), one
    // token per event, then the final event.
    let answer = "héllo the 12";
    let plain = s.tokenizer().encode(answer, false).unwrap();
    let cipher = s.encrypt_ids(&plain).unwrap();
    let eog = s.eog_cipher_ids().unwrap();
    let prompt = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n";
    let expected_prompt = s.encrypt_prompt(prompt, true).unwrap();

    let cipher2 = cipher.clone();
    let eog2 = eog.clone();
    let (url, log) = start(Arc::new(move |method, path, body| {
        assert_eq!((method, path), ("POST", "/completion"));
        // Strict protocol parsing: an unknown field would fail here.
        let req: CompletionRequest = serde_json::from_slice(body).expect("protocol request");
        assert!(req.stream);
        assert_eq!(req.stop_ids, eog2);
        assert_eq!(req.n_predict, 16);
        assert_eq!(req.temperature, 0.0);
        let mut evs: Vec<_> = cipher2
            .iter()
            .enumerate()
            .map(|(i, &t)| event(vec![t], false, i + 1))
            .collect();
        evs.push(event(vec![], true, cipher2.len()));
        Reply {
            status: 200,
            content_type: "text/event-stream",
            chunks: pieces(&sse(&evs), 7),
        }
    }))
    .await;

    let client = RemoteClient::new(&url, Backend::Equicrypt).unwrap();
    let chat = BlindChat::new(&s, &client);
    let mut seen_text = String::new();
    let mut seen_ids = Vec::new();
    let out = chat
        .generate(prompt, GenerateParams::greedy(16), |piece, ids| {
            seen_text.push_str(piece);
            seen_ids.extend_from_slice(ids);
        })
        .await
        .unwrap();
    assert_eq!(out.text, answer);
    assert_eq!(seen_text, answer);
    assert_eq!(out.cipher_ids, cipher);
    assert_eq!(seen_ids, cipher);
    assert_eq!(out.plain_ids, plain);
    assert_eq!(out.stop_type, StopType::Eos);
    assert_eq!(out.prompt_cipher_ids, expected_prompt);
    assert_eq!(out.timings.unwrap().predicted_n, cipher.len());
    // The wire carried only ciphertext ids: the prompt body is exactly the encrypted ids.
    let sent: CompletionRequest = serde_json::from_slice(&log.lock().unwrap()[0].2).unwrap();
    assert_eq!(sent.prompt, expected_prompt);
}

#[tokio::test]
async fn stream_stops_at_a_stop_id_even_if_the_server_goes_on() {
    let s = session();
    let eog = s.eog_cipher_ids().unwrap();
    let a = s
        .encrypt_ids(&s.tokenizer().encode("hello", false).unwrap())
        .unwrap();
    let mut toks = a.clone();
    toks.push(eog[0]);
    toks.extend_from_slice(&a);
    let (url, _) = start(Arc::new(move |_, _, _| Reply {
        status: 200,
        content_type: "text/event-stream",
        // No final event at all: the client must not need it after a stop id.
        chunks: pieces(&sse(&[event(toks.clone(), false, toks.len())]), 5),
    }))
    .await;
    let client = RemoteClient::new(&url, Backend::Equicrypt).unwrap();
    let out = BlindChat::new(&s, &client)
        .generate("hi", GenerateParams::greedy(8), |_, _| {})
        .await
        .unwrap();
    assert_eq!(out.text, "hello");
    assert_eq!(out.cipher_ids, a);
    assert_eq!(out.stop_type, StopType::Eos);
}

#[tokio::test]
async fn non_streamed_completion_roundtrips() {
    let resp = event(vec![4, 5, 6], true, 3);
    let resp2 = resp.clone();
    let (url, _) = start(Arc::new(move |_, _, body| {
        let req: CompletionRequest = serde_json::from_slice(body).unwrap();
        assert!(!req.stream, "complete() must not ask for a stream");
        Reply::json(200, &resp2)
    }))
    .await;
    let client = RemoteClient::new(&url, Backend::Equicrypt).unwrap();
    let req: CompletionRequest =
        serde_json::from_str(r#"{"prompt":[1,2,3],"stream":true}"#).unwrap();
    assert_eq!(client.complete(&req).await.unwrap(), resp);
    // Stop ids cut the ids client-side too.
    let req: CompletionRequest =
        serde_json::from_str(r#"{"prompt":[1,2,3],"stop_ids":[5]}"#).unwrap();
    let r = client.complete(&req).await.unwrap();
    assert_eq!(r.tokens, vec![4]);
    assert_eq!(r.stop_type, StopType::Eos);
}

#[tokio::test]
async fn fingerprint_is_checked_before_any_prompt() {
    let fp = fingerprint();
    let other = SecretKey::from_bytes([10; 32]).fingerprint();
    for (served, expect) in [
        (Some(fp.0.to_uppercase()), "ok"),
        (Some(other.0.clone()), "mismatch"),
        (None, "unavailable"),
    ] {
        let served2 = served.clone();
        let (url, log) = start(Arc::new(move |_, path, _| {
            assert_eq!(path, "/v1/models", "only /v1/models may be asked");
            Reply::json(200, &models(served2.clone()))
        }))
        .await;
        let client = RemoteClient::new(&url, Backend::Equicrypt).unwrap();
        let res = client.check_fingerprint(&fp).await;
        match expect {
            "ok" => assert_eq!(res.unwrap().vocab_size, 269),
            "mismatch" => assert!(
                matches!(&res, Err(ClientError::FingerprintMismatch { server, key })
                    if *server == other.0 && *key == fp.0),
                "{res:?}"
            ),
            _ => {
                assert!(
                    matches!(&res, Err(ClientError::FingerprintUnavailable { .. })),
                    "{res:?}"
                );
                let lenient = client.clone().allow_unverified_fingerprint(true);
                assert!(lenient.check_fingerprint(&fp).await.is_ok());
            }
        }
        assert!(log
            .lock()
            .unwrap()
            .iter()
            .all(|(_, p, _)| p == "/v1/models"));
    }
}

#[tokio::test]
async fn server_errors_are_reported() {
    let (url, _) = start(Arc::new(|_, path, _| match path {
        "/completion" => Reply::json(
            400,
            &ErrorBody::new(
                "invalid_request_error",
                "prompt id 70000 is outside the vocabulary",
            ),
        ),
        "/health" => Reply {
            status: 503,
            content_type: "text/plain",
            chunks: vec![b"loading model".to_vec()],
        },
        _ => Reply {
            status: 404,
            content_type: "text/plain",
            chunks: vec![],
        },
    }))
    .await;
    let client = RemoteClient::new(&url, Backend::Equicrypt).unwrap();
    let req: CompletionRequest = serde_json::from_str(r#"{"prompt":[70000]}"#).unwrap();
    let e = client.complete(&req).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Server { status: 400, message } if message.contains("outside")),
        "{e:?}"
    );
    let e = client.complete_stream(&req).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Server { status: 400, .. }),
        "{e:?}"
    );
    let e = client.health().await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Server { status: 503, message } if message == "loading model"),
        "{e:?}"
    );
    let e = client.model_info().await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Server { status: 404, .. }),
        "{e:?}"
    );
    let e = client
        .wait_healthy(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Server { status: 503, .. }),
        "{e:?}"
    );
}

#[tokio::test]
async fn malformed_responses_are_errors() {
    let (url, _) = start(Arc::new(|_, path, _| match path {
        "/v1/models" => Reply {
            status: 200,
            content_type: "application/json",
            chunks: vec![b"{\"object\":\"list\",\"data\":[{\"id\":1}]}".to_vec()],
        },
        _ => Reply {
            status: 200,
            content_type: "text/event-stream",
            // One good event, then the connection ends inside the next one.
            chunks: vec![
                sse(&[event(vec![3], false, 1)]),
                b"data: {\"content\":\"\",\"tok".to_vec(),
            ],
        },
    }))
    .await;
    let client = RemoteClient::new(&url, Backend::Equicrypt).unwrap();
    assert!(matches!(
        client.model_info().await,
        Err(ClientError::MalformedResponse(_))
    ));
    let req: CompletionRequest = serde_json::from_str(r#"{"prompt":[1]}"#).unwrap();
    let mut ts = client.complete_stream(&req).await.unwrap();
    assert_eq!(ts.next().await.unwrap(), Some(StreamEvent::Tokens(vec![3])));
    let e = ts.next().await.unwrap_err();
    assert!(matches!(e, ClientError::MalformedResponse(_)), "{e:?}");
    assert_eq!(ts.next().await.unwrap(), None);
    // A non-stream body that is not a completion.
    let e = client.complete(&req).await.unwrap_err();
    assert!(matches!(e, ClientError::MalformedResponse(_)), "{e:?}");
}

#[tokio::test]
async fn connection_refused_is_unreachable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = RemoteClient::new(&format!("http://127.0.0.1:{port}"), Backend::LlamaCpp).unwrap();
    let e = client.health().await.unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
    let req: CompletionRequest = serde_json::from_str(r#"{"prompt":[1]}"#).unwrap();
    let e = client.complete_stream(&req).await.unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
    let e = client.check_fingerprint(&fingerprint()).await.unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
}

/// llama-server with a file that names no EOS takes ciphertext id 2 for one and stops there (it
/// streams id 2, then its final event). With hidden stop ids the client sends no `ignore_eos`
/// (which would ban id 2), keeps id 2 as part of the answer, and continues with the prompt plus
/// the answer so far, until its own stop id.
#[tokio::test]
async fn hidden_stop_ids_continue_past_llama_servers_default_eos() {
    const SERVER_EOS: u32 = 2;
    // A key under which id 2 is an ordinary token, so it belongs in an answer.
    let tok = GgufTokenizer::from_metadata(&tiny_metadata()).unwrap();
    let s = (0u8..)
        .map(|b| CipherSession::from_key(tok.clone(), &SecretKey::from_bytes([b; 32])))
        .find(|s| !s.is_eog_cipher(SERVER_EOS).unwrap())
        .unwrap();
    let eog = s.eog_cipher_ids().unwrap();
    let prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
    let prompt_ids = s.encrypt_prompt(prompt, true).unwrap();
    // The "model"'s answer: "hello", id 2, " the", id 2, "12", then EOS.
    let word = |w: &str| {
        s.encrypt_ids(&s.tokenizer().encode(w, false).unwrap())
            .unwrap()
    };
    let mut answer = word("hello");
    answer.push(SERVER_EOS);
    answer.extend(word(" the"));
    answer.push(SERVER_EOS);
    answer.extend(word("12"));
    let expected_plain = s.decrypt_ids(&answer).unwrap();
    let expected_text = s.tokenizer().decode(&expected_plain).unwrap();
    answer.push(eog[0]);

    let (answer2, prompt2) = (answer.clone(), prompt_ids.clone());
    let (url, log) = start(Arc::new(move |method, path, body| {
        if path == "/props" {
            return Reply::json(200, &serde_json::json!({"eos_token": "<ct2>"}));
        }
        assert_eq!((method, path), ("POST", "/completion"));
        let req: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert!(req.get("ignore_eos").is_none(), "{req}");
        let sent: Vec<u32> = serde_json::from_value(req["prompt"].clone()).unwrap();
        // The prompt is the user's prompt plus some prefix of the answer.
        assert_eq!(sent[..prompt2.len()], prompt2[..]);
        let done = sent.len() - prompt2.len();
        assert_eq!(sent[prompt2.len()..], answer2[..done]);
        assert_eq!(req["n_predict"], 16 - done);
        // Stream on up to and including the next id 2 (then stop as llama-server does), or to
        // the end of the answer.
        let rest = &answer2[done..];
        let end = rest
            .iter()
            .position(|&t| t == SERVER_EOS)
            .map_or(rest.len(), |i| i + 1);
        let mut text = String::new();
        for (i, t) in rest[..end].iter().enumerate() {
            text.push_str(&format!(
                "data: {}\n\n",
                serde_json::json!({"tokens": [t], "stop": false, "tokens_predicted": i + 1})
            ));
        }
        text.push_str(&format!(
            "data: {}\n\n",
            serde_json::json!({"tokens": [], "stop": true, "stop_type": "eos",
                "tokens_predicted": end, "timings": {"prompt_n": 1, "predicted_n": end}})
        ));
        Reply {
            status: 200,
            content_type: "text/event-stream",
            chunks: pieces(text.as_bytes(), 11),
        }
    }))
    .await;

    let client = RemoteClient::new(&url, Backend::LlamaCpp).unwrap();
    let params = GenerateParams {
        hide_stop_ids: true,
        ..GenerateParams::greedy(16)
    };
    let mut streamed = String::new();
    let out = BlindChat::new(&s, &client)
        .generate(prompt, params, |t, _| streamed.push_str(t))
        .await
        .unwrap();
    assert_eq!(out.cipher_ids, answer[..answer.len() - 1]);
    assert_eq!(out.plain_ids, expected_plain);
    assert_eq!(out.text, expected_text);
    assert_eq!(streamed, expected_text);
    assert_eq!(out.stop_type, StopType::Eos);
    // Three requests: stopped at the first id 2, at the second, then the client's own EOS.
    let completions = requests_to(&log, "/completion");
    assert_eq!(completions, 3);
}

/// A llama-server that stops at once, with no token, is not asked again and again: the answer is
/// empty and ends with EOS.
#[tokio::test]
async fn a_server_stop_without_tokens_ends_the_answer() {
    let s = session();
    let (url, log) = start(Arc::new(|_, path, _| {
        if path == "/props" {
            return Reply::json(200, &serde_json::json!({"eos_token": "<ct2>"}));
        }
        let done = serde_json::json!({"tokens": [], "stop": true, "stop_type": "eos"});
        Reply {
            status: 200,
            content_type: "text/event-stream",
            chunks: vec![format!("data: {done}\n\n").into_bytes()],
        }
    }))
    .await;
    let client = RemoteClient::new(&url, Backend::LlamaCpp).unwrap();
    let params = GenerateParams {
        hide_stop_ids: true,
        ..GenerateParams::greedy(16)
    };
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        BlindChat::new(&s, &client).generate("hi", params, |_, _| {}),
    )
    .await
    .expect("the client kept asking")
    .unwrap();
    assert!(out.cipher_ids.is_empty());
    assert_eq!(out.stop_type, StopType::Eos);
    let completions = requests_to(&log, "/completion");
    assert_eq!(completions, 1);
}
