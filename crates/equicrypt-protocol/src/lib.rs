//! Wire types of the blind server's HTTP API.
//!
//! The server never sees text: prompts are arrays of ciphertext token ids and completions come back
//! as ciphertext ids. Shapes follow llama.cpp's `llama-server` (`POST /completion`) and OpenAI
//! (`POST /v1/completions`) so that existing tooling can talk to it; fields that would carry text
//! (`content`, `text`) are always empty strings.
//!
//! Errors are `{"error": {"message": "...", "type": "..."}}` with a 4xx/5xx status.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use serde::{Deserialize, Serialize};

/// Default `n_predict` when a request gives none.
pub const DEFAULT_N_PREDICT: usize = 128;

/// `POST /completion` request (llama.cpp shape, token-id prompt).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    /// Prompt as ciphertext token ids (a string prompt is rejected: the server has no tokenizer).
    pub prompt: Vec<u32>,
    /// Tokens to generate; `-1` means up to the server's limit.
    #[serde(default = "default_n_predict")]
    pub n_predict: i64,
    /// Softmax temperature (≤ 0: greedy).
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// Top-k (0: off).
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Top-p (1: off).
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    /// Sampling seed.
    #[serde(default)]
    pub seed: u64,
    /// Repetition penalty (1: off).
    #[serde(default = "default_repeat_penalty")]
    pub repeat_penalty: f32,
    /// Window of the repetition penalty.
    #[serde(default = "default_repeat_last_n")]
    pub repeat_last_n: usize,
    /// Ciphertext ids that end generation (not included in the output). The model's EOS, if the
    /// file declares one, always stops generation too.
    #[serde(default)]
    pub stop_ids: Vec<u32>,
    /// Do not stop at the model's EOS (only at `stop_ids`). Clients that stop the stream
    /// themselves send this with no `stop_ids` (llama-server: also bans the EOS id from sampling).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
    /// Stream the tokens as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Also return the top-`n_probs` `(id, logprob)` pairs of every generated position.
    #[serde(default)]
    pub n_probs: usize,
    /// Accepted for llama.cpp compatibility (the server always returns token ids).
    #[serde(default)]
    pub return_tokens: Option<bool>,
    /// Accepted for llama.cpp compatibility; ignored.
    #[serde(default)]
    pub cache_prompt: Option<bool>,
}

fn default_n_predict() -> i64 {
    DEFAULT_N_PREDICT as i64
}
fn default_temperature() -> f32 {
    0.8
}
fn default_top_k() -> usize {
    40
}
fn default_top_p() -> f32 {
    0.95
}
fn default_repeat_penalty() -> f32 {
    1.0
}
fn default_repeat_last_n() -> usize {
    64
}

/// One `(id, logprob)` alternative.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenProb {
    /// Ciphertext token id.
    pub id: u32,
    /// Natural-log probability.
    pub logprob: f32,
}

/// The top alternatives at one generated position.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PositionProbs {
    /// The id that was generated.
    pub id: u32,
    /// Its logprob.
    pub logprob: f32,
    /// The `n_probs` most likely ids, most likely first.
    pub top_logprobs: Vec<TokenProb>,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StopType {
    /// Not finished (streaming chunks).
    None,
    /// A stop id or the model's EOS was produced.
    Eos,
    /// `n_predict` (or the context) was reached.
    Limit,
}

/// Server-side timings of one request, llama.cpp names.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    /// Prompt tokens evaluated.
    pub prompt_n: usize,
    /// Milliseconds spent on the prompt.
    pub prompt_ms: f64,
    /// Tokens generated.
    pub predicted_n: usize,
    /// Milliseconds spent generating.
    pub predicted_ms: f64,
    /// Generation speed.
    pub predicted_per_second: f64,
    /// Milliseconds waiting in the queue.
    pub queue_ms: f64,
}

/// `POST /completion` response, or one server-sent event of a streamed response.
///
/// Streaming: every event carries the newly generated ids in `tokens` with `stop = false`; the last
/// event has `stop = true`, an empty `tokens`, the `stop_type` and the `timings`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CompletionResponse {
    /// Always empty: the server has no vocabulary.
    pub content: String,
    /// Generated ciphertext ids.
    pub tokens: Vec<u32>,
    /// Whether this is the final message.
    pub stop: bool,
    /// Why generation ended.
    pub stop_type: StopType,
    /// Number of tokens generated (whole request).
    pub tokens_predicted: usize,
    /// Number of prompt tokens evaluated.
    pub tokens_evaluated: usize,
    /// Top alternatives per generated position (when `n_probs > 0`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub completion_probabilities: Vec<PositionProbs>,
    /// Timings (final message only when streaming).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
}

/// `POST /v1/completions` request (OpenAI shape; `prompt` must be token ids).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OpenAiCompletionRequest {
    /// Model name (informational).
    #[serde(default)]
    pub model: Option<String>,
    /// Prompt as ciphertext token ids.
    pub prompt: Vec<u32>,
    /// Maximum tokens to generate.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Top-p.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stream as server-sent events ending in `data: [DONE]`.
    #[serde(default)]
    pub stream: bool,
    /// Stop ids (extension; OpenAI's `stop` strings are rejected).
    #[serde(default)]
    pub stop_ids: Vec<u32>,
}

/// One choice of an OpenAI completion (ids in `tokens`, `text` empty).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OpenAiChoice {
    /// Choice index (always 0).
    pub index: usize,
    /// Always empty.
    pub text: String,
    /// Generated ciphertext ids.
    pub tokens: Vec<u32>,
    /// `"stop"`, `"length"` or null while streaming.
    pub finish_reason: Option<String>,
}

/// Token usage.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Sum.
    pub total_tokens: usize,
}

/// `POST /v1/completions` response or stream chunk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OpenAiCompletionResponse {
    /// Request id.
    pub id: String,
    /// `"text_completion"`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Model id.
    pub model: String,
    /// One choice.
    pub choices: Vec<OpenAiChoice>,
    /// Usage (final response / final chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One entry of `GET /v1/models`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    /// Model id.
    pub id: String,
    /// `"model"`.
    pub object: String,
    /// Owner string.
    pub owned_by: String,
    /// Fingerprint of the key the served model was encrypted with (never the key).
    pub key_fingerprint: Option<String>,
    /// Encryption mode (`perm-exact` / `perm-full`).
    pub encryption_mode: Option<String>,
    /// Session label of a re-keyed model (`equicrypt rekey`); absent for a base encrypted model.
    /// Clients must encrypt ids with that session's permutation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length.
    pub context_length: usize,
}

/// `GET /v1/models` response.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelList {
    /// `"list"`.
    pub object: String,
    /// The served model.
    pub data: Vec<ModelInfo>,
}

/// Body of every error response.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Details of an error.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    /// One line naming the problem.
    pub message: String,
    /// Category: `invalid_request_error`, `server_busy`, `not_found`, `internal_error`.
    #[serde(rename = "type")]
    pub kind: String,
}

impl ErrorBody {
    /// Builds an error body.
    pub fn new(kind: &str, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_request_defaults_and_strictness() {
        let r: CompletionRequest = serde_json::from_str(r#"{"prompt":[1,2,3]}"#).unwrap();
        assert_eq!(r.n_predict, DEFAULT_N_PREDICT as i64);
        assert!(!r.stream);
        // A text prompt is a type error, not silently accepted.
        assert!(serde_json::from_str::<CompletionRequest>(r#"{"prompt":"hello"}"#).is_err());
        assert!(serde_json::from_str::<CompletionRequest>(r#"{"prompt":[1],"bogus":1}"#).is_err());
        assert!(serde_json::from_str::<CompletionRequest>(r#"{"prompt":[-1]}"#).is_err());
    }

    #[test]
    fn error_body_shape() {
        let v = serde_json::to_value(ErrorBody::new("invalid_request_error", "bad")).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], "bad");
    }

    #[test]
    fn stop_type_names() {
        assert_eq!(serde_json::to_string(&StopType::Eos).unwrap(), "\"eos\"");
        assert_eq!(
            serde_json::to_string(&StopType::Limit).unwrap(),
            "\"limit\""
        );
    }
}
