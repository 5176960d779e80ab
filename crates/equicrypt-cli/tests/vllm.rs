//! An encrypted transformers checkpoint served by stock vLLM, unchanged: prompts go in as
//! ciphertext token ids, completion ids come back (`--skip-tokenizer-init`,
//! `return_token_ids`), and the client (`Backend::Vllm`, `chat` / `proxy` / `generate --server
//! --backend vllm`) decrypts them. The greedy answers to the 20 built-in prompts equal those of
//! the plaintext checkpoint served by the same vLLM.
//!
//! The client side reads the plaintext checkpoint directory (`--tokenizer DIR`: its
//! `tokenizer.json` and chat template). Needs `models/smollm2-hf` (`equicrypt fetch-model
//! smollm2-hf`) and the vLLM environment
//! (`scripts/setup-vllm.sh`); SKIP otherwise unless `EQUICRYPT_REQUIRE_MODELS=1` /
//! `EQUICRYPT_REQUIRE_VLLM=1`. Both servers run in float32 and eager mode (bf16 or torch.compile
//! reorder sums and flip near-ties); each takes about two minutes to start here.

#![allow(clippy::await_holding_lock)]

mod support;

use equicrypt_client::remote::{Backend, BlindChat, BlindOutput, GenerateParams, RemoteClient};
use equicrypt_client::{ChatMessage, ChatTemplate, CipherSession, ClientError, GgufTokenizer};
use equicrypt_core::{Permutation, SecretKey, VocabPermutation};
use equicrypt_test_support::{heavy_lock, raw_http, smollm2_hf, vllm_python, VllmServer};
use serde_json::{json, Value};
use support::Proc;

/// The 20 built-in chat prompts of `equicrypt verify`.
const PROMPTS: &str = include_str!("../data/prompts.txt");

/// New tokens per prompt.
const GEN_TOKENS: usize = 24;

/// Greedy answers of `session`'s ids to every prompt through the vLLM at `client`.
async fn answers(
    session: &CipherSession,
    client: &RemoteClient,
    texts: &[String],
) -> Vec<BlindOutput> {
    let blind = BlindChat::new(session, client);
    let mut out = Vec::new();
    for t in texts {
        out.push(
            blind
                .generate(t, GenerateParams::greedy(GEN_TOKENS), |_, _| {})
                .await
                .unwrap(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_checkpoint_on_stock_vllm_answers_as_the_plain_one() {
    let test = "encrypted_checkpoint_on_stock_vllm_answers_as_the_plain_one";
    let Some(plain) = smollm2_hf(test) else {
        return;
    };
    let Some(python) = vllm_python(test) else {
        return;
    };
    let _heavy = heavy_lock();
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("k.key");
    let key = support::keygen(&key_path);
    let enc = dir.path().join("enc");
    support::encrypt(&key_path, &plain, &enc);

    // The client reads the plaintext checkpoint directory's tokenizer and chat template.
    let tok = GgufTokenizer::from_hf_dir(&plain).unwrap();
    let template = ChatTemplate::from_hf_dir(&plain, &tok).unwrap().unwrap();
    let n = tok.vocab_size();
    let identity =
        CipherSession::new(tok.clone(), VocabPermutation(Permutation::identity(n))).unwrap();
    let keyed = CipherSession::from_key(tok, &key);
    let texts: Vec<String> = PROMPTS
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|p| {
            template
                .render(&[ChatMessage::new("user", p)], true)
                .unwrap()
        })
        .collect();
    assert_eq!(texts.len(), 20);

    // The plaintext checkpoint on stock vLLM: the reference.
    let reference = {
        let server = VllmServer::start(&python, &plain, "plain", dir.path());
        let client = RemoteClient::new(&server.url(), Backend::Vllm)
            .unwrap()
            .allow_unverified_fingerprint(true);
        client.model_info().await.unwrap();
        answers(&identity, &client, &texts).await
    };

    // The encrypted checkpoint, named after the key's fingerprint.
    let fingerprint = key.fingerprint();
    let server = VllmServer::start(&python, &enc, &fingerprint.0, dir.path());
    let client = RemoteClient::new(&server.url(), Backend::Vllm).unwrap();
    let info = client.check_fingerprint(&fingerprint).await.unwrap();
    assert_eq!(info.context_length, 2048);
    let blind = answers(&keyed, &client, &texts).await;

    let mut identical = 0;
    let mut tokens = 0;
    for (k, (b, r)) in blind.iter().zip(&reference).enumerate() {
        assert_eq!(
            b.prompt_cipher_ids,
            keyed
                .encrypt_ids(&identity.decrypt_ids(&r.prompt_cipher_ids).unwrap())
                .unwrap(),
            "prompt {k}: vLLM was not sent the encrypted plaintext ids"
        );
        assert_ne!(
            b.cipher_ids, b.plain_ids,
            "prompt {k}: ciphertext equals plaintext"
        );
        tokens += r.plain_ids.len();
        if b.plain_ids == r.plain_ids {
            identical += 1;
        } else {
            println!(
                "prompt {k} differs:\n  plain:     {:?}\n  encrypted: {:?}",
                r.text, b.text
            );
        }
    }
    println!(
        "vLLM greedy answers, plain vs encrypted checkpoint: {identical}/20 identical ({tokens} tokens)"
    );
    assert_eq!(identical, 20);
    assert!(tokens > 200, "too few tokens generated: {tokens}");
    let france = &reference[0].text;
    assert!(!france.trim().is_empty());

    // Another key's client is refused before any prompt is sent.
    let other = SecretKey::generate().unwrap();
    match client.check_fingerprint(&other.fingerprint()).await {
        Err(ClientError::FingerprintMismatch { server, .. }) => assert_eq!(server, fingerprint.0),
        other => panic!("expected a fingerprint mismatch, got {other:?}"),
    }

    // Log-probabilities need vLLM's tokenizer: refused before anything is sent.
    let mut req = equicrypt_client::remote::CompletionRequest {
        prompt: blind[0].prompt_cipher_ids.clone(),
        ..serde_json::from_value(json!({"prompt": []})).unwrap()
    };
    req.n_probs = 3;
    assert!(matches!(
        client.complete(&req).await,
        Err(ClientError::Unsupported(_))
    ));
    // Non-streamed completions cut the stop id off as the streamed ones do.
    req.n_probs = 0;
    req.temperature = 0.0;
    req.n_predict = GEN_TOKENS as i64;
    req.stop_ids = keyed.eog_cipher_ids().unwrap();
    let whole = client.complete(&req).await.unwrap();
    assert_eq!(whole.tokens, blind[0].cipher_ids);

    // `generate --server --backend vllm`, the CLI's one-shot blind generation.
    let first_prompt = PROMPTS.lines().next().unwrap();
    let url = server.url();
    let out = support::run_ok(&[
        "generate".as_ref(),
        "--key".as_ref(),
        key_path.as_os_str(),
        "--tokenizer".as_ref(),
        plain.as_os_str(),
        "--server".as_ref(),
        url.as_ref(),
        "--backend".as_ref(),
        "vllm".as_ref(),
        "--prompt".as_ref(),
        first_prompt.as_ref(),
        "--max-tokens".as_ref(),
        "24".as_ref(),
    ]);
    assert_eq!(
        out.trim(),
        france.trim(),
        "generate --server --backend vllm"
    );

    // `chat --backend vllm`.
    let (chat_out, _) = support::run_chat(
        &key_path,
        &plain,
        &url,
        &["--backend", "vllm", "--max-tokens", "24"],
        &format!("{first_prompt}\n/quit\n"),
    );
    assert!(
        chat_out.contains(france.trim()),
        "chat --backend vllm: expected {france:?} in {chat_out:?}"
    );

    // `proxy --backend vllm`: plaintext OpenAI chat in front of the blind vLLM.
    let (_proxy, paddr) = Proc::proxy_to(&key_path, &plain, &url, &["--backend", "vllm"]);
    let body = json!({
        "model": "x",
        "messages": [{"role": "user", "content": first_prompt}],
        "max_tokens": 24,
        "temperature": 0,
    })
    .to_string();
    let (status, resp) = raw_http(paddr, "POST", "/v1/chat/completions", Some(&body)).unwrap();
    assert_eq!(status, 200, "{resp}");
    let v: Value = serde_json::from_str(&resp).unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.trim(), france.trim(), "{resp}");
    println!("generate, chat and proxy through vLLM answered {france:?}");
    drop(server);
}
