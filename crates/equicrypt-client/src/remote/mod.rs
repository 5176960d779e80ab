//! HTTP client for a blind inference server: ours (`equicrypt-server`, the
//! [`equicrypt_protocol`] wire types), llama.cpp's stock `llama-server` serving an encrypted GGUF,
//! or stock vLLM serving an encrypted transformers checkpoint.
//!
//! Layers:
//!
//! * [`RemoteClient`]: the endpoints — `GET /health`, `GET /v1/models` ([`RemoteClient::model_info`],
//!   [`RemoteClient::check_fingerprint`]), `POST /completion` non-streamed
//!   ([`RemoteClient::complete`]) and streamed as server-sent events
//!   ([`RemoteClient::complete_stream`] → [`TokenStream`]).
//! * [`BlindChat`]: tokenize → encrypt → request → decrypt, streaming plaintext pieces to a callback.
//!
//! Files: `transport.rs` ([`RemoteClient`]'s requests, the fingerprint and session checks, HTTP
//! errors), `token_stream.rs` ([`TokenStream`]: server-sent events, over `sse.rs`, into
//! [`StreamEvent`]s), `llamacpp.rs` (the llama-server adapter: its request and response shapes,
//! the fingerprint from `--alias` or `/props`, continuing past its default EOS), `vllm.rs` (the
//! vLLM adapter: `/v1/completions` with token-id prompts and `return_token_ids`, the fingerprint
//! from `--served-model-name`) and `chat.rs` ([`BlindChat`]). Everything public is re-exported here.
//!
//! Only ciphertext token ids ever leave this module; the key stays in the [`CipherSession`].
//!
//! # Backends
//!
//! [`Backend::Equicrypt`] speaks [`equicrypt_protocol`] exactly (strict parsing: a response that
//! does not match the types is [`ClientError::MalformedResponse`]). [`Backend::LlamaCpp`] maps the
//! same calls onto llama-server: requests carry only the fields llama-server knows
//! (`return_tokens: true`, `seed` reduced to 32 bits), responses are parsed leniently and
//! normalized into [`CompletionResponse`] (`content` cleared — it is placeholder text of the
//! encrypted vocabulary; `stop_type` `word` → [`StopType::Eos`]). llama-server has no `stop_ids`: it
//! stops at the file's EOS only, so the client stops itself when any other stop id arrives — it
//! drops the connection, which makes llama-server cancel the generation. The client applies that
//! rule on every backend; a stop id is never part of the returned ids.
//!
//! [`Backend::Vllm`] maps the calls onto vLLM's OpenAI `/v1/completions` (prompt as ids,
//! `return_token_ids: true`, `stop_token_ids`, the served model's name from `/v1/models`);
//! vLLM returns the stop id it stopped at, which the client cuts off. Log-probabilities need
//! vLLM's tokenizer, which an encrypted checkpoint is served without: `n_probs > 0` is
//! [`ClientError::Unsupported`](crate::ClientError::Unsupported).
//!
//! # Key fingerprints
//!
//! [`RemoteClient::check_fingerprint`] must pass before a prompt is sent: a model encrypted with
//! another key would receive a prompt it reads as different plaintext. Our server reports the
//! fingerprint in `/v1/models`. llama-server has no field for it, so the client looks for a
//! 32-hex-digit fingerprint in the model's id or aliases (`llama-server --alias <fingerprint>`) and
//! in `GET /props`'s `model_path` (a file named after the fingerprint); in vLLM's served model
//! name (`--served-model-name <fingerprint>`) or its `root` (the checkpoint's path). When the server reports
//! none, the check fails with [`ClientError::FingerprintUnavailable`] unless the client was built
//! with [`RemoteClient::allow_unverified_fingerprint`].
//!
//! # Hidden stop ids
//!
//! With [`GenerateParams::hide_stop_ids`] the request carries no `stop_ids` and sets
//! `ignore_eos: true` (pair it with a model written by `equicrypt encrypt --hide-special-ids`,
//! which stores no EOS id); the client watches the decrypted stream and drops the connection when
//! an end-of-generation id arrives, which makes the server cancel the job. Text and ids are those
//! of the normal path; the server wastes the tokens it generates before it notices the
//! disconnect. This keeps the EOS ids out of the request bodies and the model file, but the
//! server still sees every stream end right after the EOS id (it observes the disconnect), and
//! chat-template tokens sit at fixed positions of every prompt; the attack lab measures how well
//! traffic alone identifies them.
//!
//! llama-server reads `ignore_eos` as a −∞ logit bias on the id it takes for EOS, and for a file
//! that names no EOS that is llama.cpp's default id 2, an ordinary ciphertext token: banning it
//! would change answers. So to llama-server the client sends no `ignore_eos`; when llama-server
//! stops at an id that is none of the client's stop ids, that id is part of the answer, and
//! [`BlindChat::generate`] continues with the prompt plus the answer so far (llama-server's prompt
//! cache makes that one decoding step). Greedy answers are those of a file with the real EOS; a
//! sampled answer is drawn from the same distribution, but the sampling seed restarts at each
//! continuation, and the server sees a new request there.
//!
//! Invariants: no method panics on anything a server sends; transport failures, non-2xx answers
//! and malformed bodies or event streams are distinct [`ClientError`] variants.
//!
//! [`CipherSession`]: crate::CipherSession
//! [`ClientError`]: crate::ClientError
//! [`ClientError::MalformedResponse`]: crate::ClientError::MalformedResponse
//! [`ClientError::FingerprintUnavailable`]: crate::ClientError::FingerprintUnavailable

mod chat;
mod llamacpp;
mod sse;
mod token_stream;
mod transport;
mod vllm;

pub use equicrypt_protocol::{
    CompletionRequest, CompletionResponse, ErrorBody, ModelInfo, ModelList, PositionProbs,
    StopType, Timings,
};

pub use chat::{BlindChat, BlindOutput, GenerateParams};
pub use sse::{SseEvent, SseParser, MAX_EVENT_BYTES};
pub use token_stream::{StreamEvent, TokenStream};
pub use transport::{Backend, RemoteClient};

// The unit tests see the whole module through `use super::*`.
#[cfg(test)]
use {
    crate::{ClientError, Result},
    futures_util::stream::{self, BoxStream, StreamExt},
    llamacpp::{find_fingerprint, llamacpp_model_info, llamacpp_seed, LlamaCppRequest},
    serde_json::Value,
    transport::server_error_from_value,
    vllm::{vllm_model_info, vllm_seed, VllmRequest},
};

#[cfg(test)]
mod tests;
