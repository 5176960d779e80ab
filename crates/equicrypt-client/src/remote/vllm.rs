//! The vLLM adapter: everything specific to stock vLLM's OpenAI server serving an encrypted
//! transformers checkpoint (`python -m vllm.entrypoints.openai.api_server --model DIR
//! --skip-tokenizer-init --served-model-name <fingerprint>`).
//!
//! * Completions go to `POST /v1/completions` with the prompt as a list of ciphertext ids and
//!   `return_token_ids: true`; each choice then carries the generated ids in `token_ids`
//!   ([`VllmRequest`], [`VllmResponse`]). Streamed chunks carry the new ids the same way and end
//!   with a chunk whose `finish_reason` is set, then `data: [DONE]`.
//! * vLLM knows stop ids (`stop_token_ids`) and returns the stop id as the last of `token_ids`;
//!   the client cuts it off as it does for every backend. Without stop ids vLLM stops at the
//!   checkpoint's EOS from `generation_config.json`, which `equicrypt encrypt` writes as a
//!   ciphertext id, so `ignore_eos` (hidden stop ids) bans nothing the answer needs.
//! * The seed is an `i64` in vLLM: the client keeps the low 63 bits. vLLM's repetition penalty
//!   covers the whole sequence, not the last `repeat_last_n` ids; top-k 0 means off in both.
//! * Per-token log-probabilities need vLLM's tokenizer, which `--skip-tokenizer-init` (and the
//!   encrypted checkpoint's placeholder vocabulary) rules out: a request with `n_probs > 0` is
//!   [`ClientError::Unsupported`] before anything is sent.
//! * The key fingerprint comes from the served model's `id` (`--served-model-name`) or `root`
//!   (the checkpoint path); `max_model_len` is the context length. vLLM does not report the
//!   vocabulary size (0 in [`ModelInfo`]).
//!
//! vLLM 0.32's engine process dies on a prompt id outside the vocabulary; the client only sends
//! ids of its own tokenizer's vocabulary, which the key's permutation maps onto itself.

use equicrypt_protocol::{CompletionRequest, CompletionResponse, ModelInfo, StopType, Timings};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::llamacpp::find_fingerprint;
use crate::{ClientError, Result};

/// The `/v1/completions` body vLLM gets.
#[derive(Serialize)]
pub(super) struct VllmRequest<'a> {
    model: &'a str,
    prompt: &'a [u32],
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<i64>,
    temperature: f32,
    top_k: i64,
    top_p: f32,
    seed: i64,
    repetition_penalty: f32,
    #[serde(skip_serializing_if = "<[u32]>::is_empty")]
    stop_token_ids: &'a [u32],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ignore_eos: bool,
    stream: bool,
    return_token_ids: bool,
}

impl<'a> VllmRequest<'a> {
    /// [`ClientError::Unsupported`] for what vLLM cannot answer without a tokenizer
    /// (log-probabilities); checked before anything is sent.
    pub(super) fn check(r: &CompletionRequest) -> Result<()> {
        if r.n_probs > 0 {
            return Err(ClientError::Unsupported(
                "vLLM serving an encrypted checkpoint (--skip-tokenizer-init) returns no \
                 log-probabilities: n_probs must be 0"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The request for the served model `model` (after [`VllmRequest::check`]).
    pub(super) fn new(model: &'a str, r: &'a CompletionRequest, stream: bool) -> Self {
        Self {
            model,
            prompt: &r.prompt,
            // A negative n_predict means "up to the server's limit": vLLM's default.
            max_tokens: (r.n_predict >= 0).then_some(r.n_predict),
            temperature: r.temperature.max(0.0),
            top_k: i64::try_from(r.top_k).unwrap_or(0),
            top_p: r.top_p,
            seed: vllm_seed(r.seed),
            repetition_penalty: r.repeat_penalty,
            stop_token_ids: &r.stop_ids,
            ignore_eos: r.ignore_eos,
            stream,
            return_token_ids: true,
        }
    }
}

/// vLLM's seed is a non-negative `i64`: keep the low 63 bits.
pub(super) fn vllm_seed(seed: u64) -> i64 {
    i64::try_from(seed & (i64::MAX as u64)).unwrap_or(0)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VllmChoice {
    token_ids: Option<Vec<u32>>,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VllmUsage {
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
}

/// A `/v1/completions` response or one streamed chunk.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct VllmResponse {
    choices: Vec<VllmChoice>,
    usage: Option<VllmUsage>,
}

fn count(n: Option<i64>) -> usize {
    n.and_then(|n| usize::try_from(n).ok()).unwrap_or(0)
}

impl VllmResponse {
    /// The response as [`CompletionResponse`]: `finish_reason` `stop` → [`StopType::Eos`],
    /// `length` → [`StopType::Limit`], any other set reason → [`StopType::None`] with `stop`
    /// true. A choice without `token_ids` (a server that ignored `return_token_ids`) is
    /// malformed: its text is placeholder text of the encrypted vocabulary.
    pub(super) fn into_protocol(self) -> Result<CompletionResponse> {
        let usage = self.usage.unwrap_or_default();
        let mut out = CompletionResponse {
            content: String::new(),
            tokens: Vec::new(),
            stop: false,
            stop_type: StopType::None,
            tokens_predicted: count(usage.completion_tokens),
            tokens_evaluated: count(usage.prompt_tokens),
            completion_probabilities: Vec::new(),
            timings: None::<Timings>,
        };
        // A trailing usage-only chunk has no choices.
        let Some(choice) = self.choices.into_iter().next() else {
            return Ok(out);
        };
        out.tokens = choice.token_ids.ok_or_else(|| {
            ClientError::MalformedResponse(
                "vLLM completion has no token_ids (does the server know return_token_ids?)".into(),
            )
        })?;
        if let Some(reason) = choice.finish_reason {
            out.stop = true;
            out.stop_type = match reason.as_str() {
                "stop" => StopType::Eos,
                "length" => StopType::Limit,
                _ => StopType::None,
            };
        }
        Ok(out)
    }
}

/// [`ModelInfo`] from vLLM's `/v1/models` (`data[0]` with `id`, `root`, `max_model_len`).
pub(super) fn vllm_model_info(v: &Value) -> Result<ModelInfo> {
    let m = v
        .get("data")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .ok_or_else(|| ClientError::MalformedResponse("/v1/models lists no model".into()))?;
    let text = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let id = text("id");
    if id.is_empty() {
        return Err(ClientError::MalformedResponse(
            "vLLM /v1/models: the model has no id".into(),
        ));
    }
    let context_length = m
        .get("max_model_len")
        .and_then(Value::as_u64)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0);
    let root = text("root");
    let key_fingerprint = find_fingerprint(&id).or_else(|| find_fingerprint(&root));
    Ok(ModelInfo {
        key_fingerprint,
        owned_by: m
            .get("owned_by")
            .and_then(Value::as_str)
            .unwrap_or("vllm")
            .to_string(),
        id,
        object: "model".into(),
        encryption_mode: None,
        session: None,
        vocab_size: 0,
        context_length,
    })
}
