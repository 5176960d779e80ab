//! Autoregressive generation loop over any [`Engine`].

use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::sampler::{Sampler, SamplingParams};

/// Why [`generate`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// `max_new` tokens were produced.
    MaxTokens,
    /// A stop id was sampled (it is not part of [`Generation::tokens`]).
    StopToken(u32),
    /// The `on_token` callback returned `false` (the token it saw *is* included).
    Callback,
    /// The context window is full.
    ContextFull,
}

/// Output of [`generate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// Generated ids, in order, excluding the prompt and any stop id.
    pub tokens: Vec<u32>,
    /// Why generation ended.
    pub stop: StopReason,
}

/// Feeds `prompt` to `engine` (after whatever it already holds: call [`Engine::reset`] first for a
/// fresh conversation), then samples up to `max_new` ids.
///
/// Each sampled id is checked against `stop_ids` first (a stop id ends generation and is neither
/// returned nor passed to `on_token`); otherwise it is appended to the output and passed to
/// `on_token`, which returns whether to continue. The prompt enters the repetition-penalty window.
/// Ids are opaque, so this works unchanged on ciphertext ids with ciphertext stop ids.
pub fn generate<E: Engine + ?Sized>(
    engine: &mut E,
    prompt: &[u32],
    max_new: usize,
    params: &SamplingParams,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(EngineError::EmptyInput);
    }
    let mut sampler = Sampler::new(params.clone())?;
    for &id in prompt {
        sampler.accept(id);
    }
    let mut tokens = Vec::new();
    if max_new == 0 {
        return Ok(Generation {
            tokens,
            stop: StopReason::MaxTokens,
        });
    }
    let mut logits = engine.forward(prompt)?;
    loop {
        let id = sampler.sample(&logits)?;
        if stop_ids.contains(&id) {
            return Ok(Generation {
                tokens,
                stop: StopReason::StopToken(id),
            });
        }
        tokens.push(id);
        sampler.accept(id);
        if !on_token(id) {
            return Ok(Generation {
                tokens,
                stop: StopReason::Callback,
            });
        }
        if tokens.len() >= max_new {
            return Ok(Generation {
                tokens,
                stop: StopReason::MaxTokens,
            });
        }
        if engine.position() >= engine.context_length() {
            return Ok(Generation {
                tokens,
                stop: StopReason::ContextFull,
            });
        }
        logits = engine.forward(&[id])?;
    }
}
