//! The llama-server adapter: everything specific to llama.cpp's stock `llama-server` serving an
//! encrypted GGUF.
//!
//! * Requests carry only the fields llama-server knows ([`LlamaCppRequest`]: `return_tokens`,
//!   the seed reduced to 32 bits); responses are parsed leniently ([`LlamaCppResponse`]) and
//!   normalized into [`CompletionResponse`].
//! * The key fingerprint comes from the model's id or aliases (`llama-server --alias
//!   <fingerprint>`), or from `/props`' `model_path`/`model_alias`; the EOS id it stops at by
//!   itself from `/props`' `eos_token` (`<ct{id}>`).
//! * With hidden stop ids llama-server gets no `ignore_eos` (for a file that names no EOS it
//!   would ban llama.cpp's default id 2, an ordinary ciphertext token), so the blind chat
//!   continues past a stop llama-server makes by itself ([`continue_after_server_stop`]).

use equicrypt_protocol::{
    CompletionRequest, CompletionResponse, ModelInfo, PositionProbs, StopType, Timings,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::chat::{BlindOutput, GenerateParams};
use super::transport::{Backend, RemoteClient};
use crate::{ClientError, Result};

impl RemoteClient {
    /// The served model from llama-server's `/v1/models` body `models`; when the fingerprint is
    /// not in the model's names, it is looked for in `/props`.
    pub(super) async fn llamacpp_model_info(&self, models: &Value) -> Result<ModelInfo> {
        let mut info = llamacpp_model_info(models)?;
        if info.key_fingerprint.is_none() {
            // `/props` is optional information: a failure here only means "no fingerprint".
            if let Ok(props) = self.get_bytes("/props").await {
                if let Ok(p) = serde_json::from_slice::<Value>(&props) {
                    info.key_fingerprint = ["model_path", "model_alias"]
                        .iter()
                        .filter_map(|k| p.get(*k).and_then(Value::as_str))
                        .find_map(find_fingerprint);
                }
            }
        }
        Ok(info)
    }

    /// llama-server's EOS as a ciphertext id, if `/props` names it as `<ct{id}>`.
    pub(super) async fn llamacpp_eos(&self) -> Option<u32> {
        *self
            .server_eos
            .get_or_init(|| async {
                let body = self.get_bytes("/props").await.ok()?;
                let v: Value = serde_json::from_slice(&body).ok()?;
                let eos = v.get("eos_token")?.as_str()?;
                eos.strip_prefix("<ct")?.strip_suffix('>')?.parse().ok()
            })
            .await
    }
}

/// Whether [`super::BlindChat::generate`] continues past stops the server makes by itself:
/// with hidden stop ids on llama-server, which is then left to stop at the id it takes for EOS
/// (see the module docs).
pub(super) fn continues_past_server_stops(params: &GenerateParams, backend: Backend) -> bool {
    params.hide_stop_ids && backend == Backend::LlamaCpp
}

/// After one streamed request of a generation that continues past server stops: whether to ask
/// again. It does when the server stopped (`Eos`) at an id that ends nothing for this client
/// (`ended_at_stop_id` false; the id is part of the answer, already delivered) after producing
/// something (`out.cipher_ids` grew past `delivered_before`: a stop that produced nothing is
/// final, asking again would loop) and `max_tokens` is not spent; `req` then asks for the rest
/// with the prompt plus the answer so far. A spent budget ends the answer with
/// [`StopType::Limit`].
pub(super) fn continue_after_server_stop(
    req: &mut CompletionRequest,
    out: &mut BlindOutput,
    delivered_before: usize,
    ended_at_stop_id: bool,
    max_tokens: usize,
) -> bool {
    let left = max_tokens.saturating_sub(out.cipher_ids.len());
    let false_stop = out.stop_type == StopType::Eos
        && !ended_at_stop_id
        && out.cipher_ids.len() > delivered_before;
    if !false_stop {
        return false;
    }
    if left == 0 {
        out.stop_type = StopType::Limit;
        return false;
    }
    // llama-server's prompt cache makes this one decoding step; a sampling seed restarts,
    // greedy answers are unchanged.
    req.prompt = out.prompt_cipher_ids.clone();
    req.prompt.extend_from_slice(&out.cipher_ids);
    req.n_predict = i64::try_from(left).unwrap_or(i64::MAX);
    true
}

/// The `/completion` fields llama-server understands.
#[derive(Serialize)]
pub(super) struct LlamaCppRequest<'a> {
    prompt: &'a [u32],
    n_predict: i64,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    seed: u32,
    repeat_penalty: f32,
    repeat_last_n: usize,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ignore_eos: bool,
    stream: bool,
    return_tokens: bool,
    n_probs: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_prompt: Option<bool>,
}

impl<'a> LlamaCppRequest<'a> {
    pub(super) fn new(r: &'a CompletionRequest, stream: bool) -> Self {
        Self {
            prompt: &r.prompt,
            n_predict: r.n_predict,
            temperature: r.temperature,
            top_k: r.top_k,
            top_p: r.top_p,
            seed: llamacpp_seed(r.seed),
            repeat_penalty: r.repeat_penalty,
            repeat_last_n: r.repeat_last_n,
            ignore_eos: r.ignore_eos,
            stream,
            return_tokens: true,
            n_probs: r.n_probs,
            cache_prompt: r.cache_prompt,
        }
    }
}

/// llama-server's seed is a `uint32_t` whose all-ones value means "random": keep the low 32 bits
/// and move that one value aside so that every seed stays deterministic.
pub(super) fn llamacpp_seed(seed: u64) -> u32 {
    let s = (seed & 0xFFFF_FFFF) as u32;
    if s == u32::MAX {
        u32::MAX - 1
    } else {
        s
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LlamaCppTimings {
    prompt_n: Option<i64>,
    prompt_ms: Option<f64>,
    predicted_n: Option<i64>,
    predicted_ms: Option<f64>,
    predicted_per_second: Option<f64>,
    queue_ms: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct LlamaCppResponse {
    tokens: Vec<u32>,
    stop: bool,
    stop_type: Option<String>,
    tokens_predicted: Option<i64>,
    tokens_evaluated: Option<i64>,
    completion_probabilities: Vec<PositionProbs>,
    timings: Option<LlamaCppTimings>,
}

fn count(n: Option<i64>) -> usize {
    n.and_then(|n| usize::try_from(n).ok()).unwrap_or(0)
}

impl LlamaCppResponse {
    pub(super) fn into_protocol(self) -> CompletionResponse {
        let stop_type = match self.stop_type.as_deref() {
            Some("eos") | Some("word") => StopType::Eos,
            Some("limit") => StopType::Limit,
            _ => StopType::None,
        };
        CompletionResponse {
            content: String::new(),
            tokens: self.tokens,
            stop: self.stop,
            stop_type,
            tokens_predicted: count(self.tokens_predicted),
            tokens_evaluated: count(self.tokens_evaluated),
            completion_probabilities: self.completion_probabilities,
            timings: self.timings.map(|t| Timings {
                prompt_n: count(t.prompt_n),
                prompt_ms: t.prompt_ms.unwrap_or(0.0),
                predicted_n: count(t.predicted_n),
                predicted_ms: t.predicted_ms.unwrap_or(0.0),
                predicted_per_second: t.predicted_per_second.unwrap_or(0.0),
                queue_ms: t.queue_ms.unwrap_or(0.0),
            }),
        }
    }
}

/// [`ModelInfo`] from llama-server's `/v1/models` (`data[0]` with `meta.n_vocab`, `meta.n_ctx`).
pub(super) fn llamacpp_model_info(v: &Value) -> Result<ModelInfo> {
    let m = v
        .get("data")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .ok_or_else(|| ClientError::MalformedResponse("/v1/models lists no model".into()))?;
    let id = m
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let meta = m.get("meta");
    let num = |k: &str| {
        meta.and_then(|x| x.get(k))
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
    };
    let vocab_size = num("n_vocab").ok_or_else(|| {
        ClientError::MalformedResponse("llama-server /v1/models has no meta.n_vocab".into())
    })?;
    let context_length = num("n_ctx").or_else(|| num("n_ctx_train")).unwrap_or(0);
    let mut names = vec![id.clone()];
    if let Some(a) = m.get("aliases").and_then(Value::as_array) {
        names.extend(a.iter().filter_map(Value::as_str).map(str::to_string));
    }
    Ok(ModelInfo {
        key_fingerprint: names.iter().find_map(|n| find_fingerprint(n)),
        id,
        object: "model".into(),
        owned_by: m
            .get("owned_by")
            .and_then(Value::as_str)
            .unwrap_or("llamacpp")
            .to_string(),
        encryption_mode: None,
        session: None,
        vocab_size,
        context_length,
    })
}

/// The first run of exactly 32 hex digits in `s` (a key fingerprint), lower-cased.
pub(super) fn find_fingerprint(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_hexdigit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_hexdigit() {
                i += 1;
            }
            if i - start == 32 {
                return Some(s[start..i].to_ascii_lowercase());
            }
        } else {
            i += 1;
        }
    }
    None
}
