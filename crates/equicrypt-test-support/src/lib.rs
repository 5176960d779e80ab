//! Shared helpers of equicrypt's integration tests; a dev-dependency only, never published.
//!
//! * [`smollm2`] / [`model_or_skip`]: where the real model is (`EQUICRYPT_SMOLLM2`, else
//!   `models/smollm2/…` in the workspace) and the SKIP policy (`EQUICRYPT_REQUIRE_MODELS=1` turns a
//!   missing model into a failure).
//! * [`llama_cpp_python`], [`llama_server`], [`openai_python`]: presence checks of the optional
//!   stock tools with their `EQUICRYPT_REQUIRE_LLAMACPP` / `_LLAMA_SERVER` / `_OPENAI` variables.
//! * [`vllm_python`], [`VllmServer`]: stock vLLM (`EQUICRYPT_REQUIRE_VLLM`), a server whose whole
//!   process group is killed when dropped.
//! * [`ChildGuard`]: a child process killed (and reaped) when dropped.
//! * [`raw_http`]: one HTTP/1.0 request without an HTTP client library.
//! * [`heavy_lock`]: serializes the tests of one binary that run a model.
//! * [`margin`]: the greedy top-1 − top-2 logit gap of the plain model, to pick prompts whose
//!   greedy answer cannot flip between CPU kinds or engines.

mod child;
mod http;
pub mod margin;
mod paths;
mod vllm;

pub use child::ChildGuard;
pub use http::raw_http;
pub use margin::{
    assert_margin, chat_margin, completion_margin, greedy_margin, ids_margin, wide_margin_chat,
    Margin, MIN_MARGIN, WIDE_MARGIN_COMPLETION, WIDE_MARGIN_SYSTEM, WIDE_MARGIN_USER,
};
pub use paths::{
    flag, gemma3, hf_python, llama_cpp_python, llama_server, model_or_skip, openai_python,
    python_has_module, require_or_skip, smollm2, smollm2_hf, workspace, GEMMA3_REL, SMOLLM2_REL,
};
pub use vllm::{vllm_python, VllmServer};

use std::sync::{Mutex, MutexGuard};

/// Serializes the tests of one test binary that run a model: the CI machines have two cores, and
/// candle's quantized CPU path (and ggml) spin-wait, so two model runs per core collapse.
pub fn heavy_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
