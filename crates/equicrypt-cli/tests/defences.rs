//! The two defences end to end on tiny synthetic models:
//! per-session vocabulary re-keying (`rekey`: bit-exact logits, the CLI command) and hidden
//! special ids (`encrypt --hide-special-ids` + `GenerateParams::hide_stop_ids` against our
//! server in-process: identical answers, no stop ids on the wire).

mod support;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use equicrypt_client::remote::{Backend, BlindChat, GenerateParams, RemoteClient, StopType};
use equicrypt_client::{CipherSession, GgufTokenizer};
use equicrypt_core::{SecretKey, VocabPermutation};
use equicrypt_engine::{Engine, LlamaModel, SamplingParams};
use equicrypt_model::synthetic::SyntheticLlama;
use equicrypt_model::{encrypt_gguf, rekey_gguf, EncryptOptions};
use equicrypt_server::{Limits, ModelMeta, Server};
use support::{run_ok, BIN};

fn tiny(vocab: usize, untied: bool, seed: u64) -> SyntheticLlama {
    let mut m = SyntheticLlama::tiny_f32(seed);
    m.shape.vocab = vocab;
    m.matrix_dtype = GgmlDType::Q4_1;
    m.embed_dtype = GgmlDType::Q8_0;
    m.untied_head = untied;
    m
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Logits of the session model on `σ_s(ids)`, un-permuted, equal the base encrypted model's
/// logits on `ids` bit for bit (tied and untied heads, every position).
#[test]
fn session_model_logits_equal_base_logits_bit_for_bit() {
    let key = SecretKey::from_bytes([21; 32]);
    for untied in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (p, e, s) = (
            dir.path().join("p.gguf"),
            dir.path().join("e.gguf"),
            dir.path().join("s.gguf"),
        );
        let m = tiny(96, untied, 5);
        m.write(&p).unwrap();
        encrypt_gguf(&key, &p, &e, &EncryptOptions::default()).unwrap();
        rekey_gguf(&e, &key, "sess-1", &s, false).unwrap();
        let v = m.shape.vocab;
        let sigma = VocabPermutation::derive_session_rekey(&key, "sess-1", v).unwrap();
        let ids: Vec<u32> = vec![3, 17, 95, 0, 42, 42, 7, 64, 1];
        let sess_ids: Vec<u32> = ids.iter().map(|&c| sigma.apply(c)).collect();
        let base = LlamaModel::load(&e).unwrap().forward_all(&ids).unwrap();
        let sess = LlamaModel::load(&s)
            .unwrap()
            .forward_all(&sess_ids)
            .unwrap();
        assert_eq!(base.len(), sess.len());
        let mut unperm = vec![0f32; sess.len()];
        for (row_s, row_u) in sess.chunks(v).zip(unperm.chunks_mut(v)) {
            for (c, u) in row_u.iter_mut().enumerate() {
                *u = row_s[sigma.apply(c as u32) as usize];
            }
        }
        assert_eq!(bits(&base), bits(&unperm), "untied = {untied}");
        // And against the plaintext model through the composed client permutation.
        let composed = VocabPermutation::derive_session(&key, "sess-1", v).unwrap();
        let plain = LlamaModel::load(&p).unwrap().forward_all(&ids).unwrap();
        let sess2 = LlamaModel::load(&s)
            .unwrap()
            .forward_all(&composed.encrypt_ids(&ids).unwrap())
            .unwrap();
        for (row_p, row_s) in plain.chunks(v).zip(sess2.chunks(v)) {
            for (pid, &x) in row_p.iter().enumerate() {
                let cid = composed.encrypt_id(pid as u32).unwrap() as usize;
                assert_eq!(x.to_bits(), row_s[cid].to_bits());
            }
        }
    }
}

/// `equicrypt rekey` writes the session model and reports time, table bytes and file size;
/// `--bench` builds tables in memory; a session model is not re-keyed again.
#[test]
fn rekey_command_reports_and_refuses_a_session_model() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("k.key");
    support::keygen(&key_path);
    let (p, e, s) = (
        dir.path().join("p.gguf"),
        dir.path().join("e.gguf"),
        dir.path().join("s.gguf"),
    );
    tiny(96, true, 8).write(&p).unwrap();
    support::encrypt(&key_path, &p, &e);
    let out = run_ok(&[
        "rekey".as_ref(),
        "--encrypted".as_ref(),
        e.as_os_str(),
        "--key".as_ref(),
        key_path.as_os_str(),
        "--session".as_ref(),
        "user-1".as_ref(),
        "--out".as_ref(),
        s.as_os_str(),
    ]);
    assert!(out.contains("re-key time:"), "{out}");
    let table_bytes = 2 * 96 * (64 / 32 * 34); // token_embd + output, Q8_0
    assert!(
        out.contains(&format!("per-session tables: {table_bytes} bytes")),
        "{out}"
    );
    let size = std::fs::metadata(&s).unwrap().len();
    assert!(
        out.contains(&format!("session file:       {size} bytes")),
        "{out}"
    );
    let bench = run_ok(&[
        "rekey".as_ref(),
        "--encrypted".as_ref(),
        e.as_os_str(),
        "--key".as_ref(),
        key_path.as_os_str(),
        "--bench".as_ref(),
        "3".as_ref(),
    ]);
    assert!(bench.contains("per session"), "{bench}");
    assert!(bench.contains("resident memory:"), "{bench}");
    let inspect = run_ok(&["inspect".as_ref(), s.as_os_str()]);
    assert!(inspect.contains("session:       'user-1'"), "{inspect}");
    let o = std::process::Command::new(BIN)
        .args(["rekey", "--encrypted"])
        .arg(&s)
        .arg("--key")
        .arg(&key_path)
        .args(["--session", "user-2", "--out"])
        .arg(dir.path().join("s2.gguf"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("already the session model of 'user-1'"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let o = std::process::Command::new(BIN)
        .args(["rekey", "--encrypted"])
        .arg(&e)
        .arg("--key")
        .arg(&key_path)
        .args(["--session", "bad label", "--out"])
        .arg(dir.path().join("s3.gguf"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("invalid session label"), "{err}");
}

/// A byte-level tokenizer of `vocab` ids: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, the 256
/// byte tokens, then filler; EOS is `eos`.
fn tokenizer(vocab: usize, eos: u32) -> GgufTokenizer {
    let mut tokens: Vec<Value> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|t| Value::String(t.to_string()))
        .collect();
    let mut types = vec![Value::I32(3); 3];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let c = if matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF) {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
        tokens.push(Value::String(c.to_string()));
        types.push(Value::I32(1));
    }
    while tokens.len() < vocab {
        tokens.push(Value::String(format!("<filler{}>", tokens.len())));
        types.push(Value::I32(1));
    }
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    md.insert("tokenizer.ggml.pre".into(), Value::String("smollm".into()));
    md.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens));
    md.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
    md.insert("tokenizer.ggml.merges".into(), Value::Array(Vec::new()));
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(eos));
    GgufTokenizer::from_metadata(&md).unwrap()
}

async fn start_server(model: &Path) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let meta = ModelMeta::read(model).unwrap();
    let engine = LlamaModel::load(model).unwrap();
    let server = Server::start(engine, meta, Limits::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(listener, async move {
        let _ = rx.await;
    }));
    (addr, tx)
}

/// Hidden stop ids give the same answer as stop ids sent to the server, and no stop id crosses
/// the wire in a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_stop_ids_give_identical_answers_and_send_no_stop_ids() {
    const VOCAB: usize = 300;
    const MAX: usize = 40;
    // A mild repetition penalty keeps the random tiny model from repeating one id.
    const PENALTY: f32 = 1.5;
    let key = SecretKey::from_bytes([33; 32]);
    let dir = tempfile::tempdir().unwrap();
    let (p, e, h) = (
        dir.path().join("p.gguf"),
        dir.path().join("e.gguf"),
        dir.path().join("h.gguf"),
    );
    tiny(VOCAB, true, 12).write(&p).unwrap();
    encrypt_gguf(&key, &p, &e, &EncryptOptions::default()).unwrap();
    let hidden = EncryptOptions {
        hide_special_ids: true,
        ..Default::default()
    };
    encrypt_gguf(&key, &p, &h, &hidden).unwrap();
    assert!(ModelMeta::read(&h).unwrap().eos_id.is_none());

    let prompt = "hello world";
    let plain_prompt = tokenizer(VOCAB, 2).encode(prompt, true).unwrap();
    let mut plain = LlamaModel::load(&p).unwrap();
    let gen = equicrypt_engine::generate(
        &mut plain,
        &plain_prompt,
        MAX,
        &SamplingParams {
            temperature: 0.0,
            top_k: 1,
            top_p: 1.0,
            repeat_penalty: PENALTY,
            repeat_last_n: 64,
            seed: 0,
        },
        &[],
        |_| true,
    )
    .unwrap();
    // Pick an EOS the answer reaches after a few tokens: a new id at position 5 or later.
    let eos = (5..gen.tokens.len())
        .map(|i| gen.tokens[i])
        .zip(5..)
        .find(|&(t, i)| t > 2 && !gen.tokens[..i].contains(&t))
        .map(|(t, _)| t)
        .expect("the tiny model's answer has new ids");
    let tok = tokenizer(VOCAB, eos);
    let session = CipherSession::new(tok.clone(), VocabPermutation::derive(&key, VOCAB)).unwrap();
    let eog = session.eog_cipher_ids().unwrap();
    let stop_at = gen
        .tokens
        .iter()
        .position(|&t| tok.is_eog(t))
        .expect("the answer reaches an end-of-generation id");
    assert!((5..MAX).contains(&stop_at), "{stop_at}");

    let (addr_n, stop_n) = start_server(&e).await;
    let (addr_h, stop_h) = start_server(&h).await;
    let relay_n = support::Relay::start(addr_n).await;
    let relay_h = support::Relay::start(addr_h).await;
    let client_n = RemoteClient::new(&relay_n.url(), Backend::Equicrypt).unwrap();
    let client_h = RemoteClient::new(&relay_h.url(), Backend::Equicrypt).unwrap();
    client_n
        .check_fingerprint(&key.fingerprint())
        .await
        .unwrap();
    client_h
        .check_fingerprint(&key.fingerprint())
        .await
        .unwrap();
    let params = GenerateParams {
        repeat_penalty: PENALTY,
        repeat_last_n: 64,
        ..GenerateParams::greedy(MAX)
    };
    let normal = BlindChat::new(&session, &client_n)
        .generate(prompt, params.clone(), |_, _| {})
        .await
        .unwrap();
    let hidden_params = GenerateParams {
        hide_stop_ids: true,
        ..params
    };
    let hidden = BlindChat::new(&session, &client_h)
        .generate(prompt, hidden_params, |_, _| {})
        .await
        .unwrap();

    assert_eq!(normal.stop_type, StopType::Eos);
    assert_eq!(hidden.stop_type, StopType::Eos);
    assert_eq!(normal.plain_ids, gen.tokens[..stop_at].to_vec());
    assert_eq!(hidden.plain_ids, normal.plain_ids);
    assert_eq!(hidden.cipher_ids, normal.cipher_ids);
    assert_eq!(hidden.text, normal.text);
    assert_eq!(hidden.prompt_cipher_ids, normal.prompt_cipher_ids);

    // Requests: the normal one names the stop ids, the hidden one names none and asks the server
    // not to stop at its EOS.
    let up_n = relay_n.rec.up_text();
    let up_h = relay_h.rec.up_text();
    assert!(
        up_n.contains(&format!("\"stop_ids\":{}", support::json_ids(&eog))),
        "{up_n}"
    );
    assert!(up_h.contains("\"stop_ids\":[]"), "{up_h}");
    assert!(up_h.contains("\"ignore_eos\":true"), "{up_h}");
    // The hidden server did stream the end-of-generation id; the client stopped there.
    let stop_cipher = session.encrypt_ids(&[gen.tokens[stop_at]]).unwrap()[0];
    let down_h = relay_h.rec.down_text();
    assert!(
        down_h.contains(&format!("\"tokens\":[{stop_cipher}]")),
        "{down_h}"
    );
    let _ = stop_n.send(());
    let _ = stop_h.send(());
}

/// Our server reports a re-keyed file's session label in `/v1/models`, and a client encrypting
/// for another session (or for none) is refused before any prompt is sent, in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_for_another_session_is_refused_before_any_prompt() {
    use equicrypt_client::ClientError;
    let key = SecretKey::from_bytes([44; 32]);
    let dir = tempfile::tempdir().unwrap();
    let (p, e, s) = (
        dir.path().join("p.gguf"),
        dir.path().join("e.gguf"),
        dir.path().join("s.gguf"),
    );
    tiny(96, false, 9).write(&p).unwrap();
    encrypt_gguf(&key, &p, &e, &EncryptOptions::default()).unwrap();
    rekey_gguf(&e, &key, "user-7", &s, false).unwrap();
    assert_eq!(ModelMeta::read(&e).unwrap().session, None);
    assert_eq!(
        ModelMeta::read(&s).unwrap().session.as_deref(),
        Some("user-7")
    );

    let (addr_e, stop_e) = start_server(&e).await;
    let (addr_s, stop_s) = start_server(&s).await;
    let relay_s = support::Relay::start(addr_s).await;
    let client = |addr: std::net::SocketAddr, session: Option<&str>| {
        RemoteClient::new(&format!("http://{addr}"), Backend::Equicrypt)
            .unwrap()
            .expect_session(session)
    };
    let fp = key.fingerprint();

    // The matching session passes and is reported.
    let info = client(relay_s.addr, Some("user-7"))
        .check_fingerprint(&fp)
        .await
        .unwrap();
    assert_eq!(info.session.as_deref(), Some("user-7"));
    // A base-model client against a session model, and a client for another session.
    for session in [None, Some("user-8")] {
        match client(relay_s.addr, session).check_fingerprint(&fp).await {
            Err(e @ ClientError::SessionMismatch { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("session 'user-7'"), "{msg}");
                assert!(msg.contains("--session"), "{msg}");
            }
            other => panic!("{session:?}: expected a session mismatch, got {other:?}"),
        }
    }
    // A session client against the base model.
    let info = client(addr_e, None).check_fingerprint(&fp).await.unwrap();
    assert_eq!(info.session, None);
    match client(addr_e, Some("user-7")).check_fingerprint(&fp).await {
        Err(ClientError::SessionMismatch { server, client }) => {
            assert_eq!((server, client.as_deref()), (None, Some("user-7")));
        }
        other => panic!("expected a session mismatch, got {other:?}"),
    }
    // A wrong key is still reported as such first.
    let other = SecretKey::from_bytes([45; 32]).fingerprint();
    assert!(matches!(
        client(relay_s.addr, None).check_fingerprint(&other).await,
        Err(ClientError::FingerprintMismatch { .. })
    ));
    // No refused client sent a completion request.
    let up = relay_s.rec.up_text();
    assert!(up.contains("GET /v1/models"), "{up}");
    assert!(
        !up.contains("/completion"),
        "a refused client reached /completion:\n{up}"
    );
    let _ = stop_e.send(());
    let _ = stop_s.send(());
}
