//! Greedy margins: how far the greedy answer is from flipping.
//!
//! Greedy decoding is only reproducible across CPU kinds and engines (ours, llama.cpp) when every
//! step's top-1 logit beats the top-2 by more than their numeric differences. A test that checks a
//! particular answer uses a prompt whose margin is large, and checks it with [`assert_margin`].
//! (SmolLM2's template adds a default system message when a chat has none; after it, the first
//! answer token to "What is the capital of France?" is a 0.08-logit near-tie.)

use std::path::Path;

use equicrypt_client::{ChatMessage, ChatTemplate, GgufTokenizer};
use equicrypt_engine::{Engine, LlamaModel};

/// The smallest top-1 − top-2 logit gap a test accepts for a particular greedy answer.
pub const MIN_MARGIN: f32 = 1.0;

/// A greedy generation with the top-1 − top-2 logit gap of every step.
#[derive(Clone, Debug, PartialEq)]
pub struct Margin {
    /// The greedy tokens, the stop token (if any) included.
    pub tokens: Vec<u32>,
    /// `gaps[i]`: top-1 − top-2 logit when `tokens[i]` was chosen.
    pub gaps: Vec<f32>,
    /// Whether generation ended at a stop id (else it ran to `max_tokens`).
    pub stopped: bool,
    /// The answer's text (stop token left out), when made by [`chat_margin`] or [`completion_margin`].
    pub text: String,
}

impl Margin {
    /// The smallest gap over all steps (`+inf` for no step).
    pub fn min(&self) -> f32 {
        self.gaps.iter().copied().fold(f32::INFINITY, f32::min)
    }

    /// The step with the smallest gap.
    pub fn argmin(&self) -> Option<usize> {
        (0..self.gaps.len()).min_by(|&a, &b| self.gaps[a].total_cmp(&self.gaps[b]))
    }
}

/// Top-1 index and top-1 − top-2 gap of one logit row.
fn top2(row: &[f32]) -> (u32, f32) {
    let (mut i1, mut v1, mut v2) = (0usize, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if v > v1 {
            (v2, v1, i1) = (v1, v, i);
        } else if v > v2 {
            v2 = v;
        }
    }
    (i1 as u32, v1 - v2)
}

/// Greedy generation from `prompt` (fresh cache) until a `stop_ids` token or `max_tokens` tokens,
/// recording each step's gap.
pub fn greedy_margin<E: Engine + ?Sized>(
    engine: &mut E,
    prompt: &[u32],
    max_tokens: usize,
    stop_ids: &[u32],
) -> Margin {
    engine.reset();
    let mut logits = engine.forward(prompt).expect("forward the prompt");
    let mut m = Margin {
        tokens: Vec::new(),
        gaps: Vec::new(),
        stopped: false,
        text: String::new(),
    };
    while m.tokens.len() < max_tokens {
        let (tok, gap) = top2(&logits);
        m.tokens.push(tok);
        m.gaps.push(gap);
        if stop_ids.contains(&tok) {
            m.stopped = true;
            break;
        }
        if m.tokens.len() == max_tokens {
            break;
        }
        logits = engine.forward(&[tok]).expect("forward one token");
    }
    m
}

/// The plain model's greedy [`Margin`] of the already tokenized `prompt`, stopping at the model's
/// end-of-generation ids.
pub fn ids_margin(model: &Path, prompt: &[u32], max_tokens: usize) -> Margin {
    let tok = GgufTokenizer::from_path(model).expect("tokenizer of the model");
    let mut engine = LlamaModel::load(model).expect("load the model");
    let mut m = greedy_margin(&mut engine, prompt, max_tokens, tok.eog_ids());
    let body = if m.stopped {
        &m.tokens[..m.tokens.len() - 1]
    } else {
        &m.tokens[..]
    };
    m.text = tok.decode(body).expect("decode the answer");
    m
}

/// The plain model's greedy [`Margin`] on `messages` rendered with the model's chat template
/// (generation prompt added), as the blind chat paths tokenize it.
pub fn chat_margin(model: &Path, messages: &[ChatMessage], max_tokens: usize) -> Margin {
    let tok = GgufTokenizer::from_path(model).expect("tokenizer of the model");
    let content = {
        let mut f = std::fs::File::open(model).expect("open the model");
        candle_content(&mut f)
    };
    let text = ChatTemplate::from_content(&content)
        .expect("chat template")
        .render(messages, true)
        .expect("render the chat");
    ids_margin(
        model,
        &tok.encode(&text, true).expect("tokenize"),
        max_tokens,
    )
}

/// The plain model's greedy [`Margin`] on a plain-text completion prompt.
pub fn completion_margin(model: &Path, prompt: &str, max_tokens: usize) -> Margin {
    let tok = GgufTokenizer::from_path(model).expect("tokenizer of the model");
    ids_margin(
        model,
        &tok.encode(prompt, true).expect("tokenize"),
        max_tokens,
    )
}

fn candle_content(f: &mut std::fs::File) -> candle_core::quantized::gguf_file::Content {
    candle_core::quantized::gguf_file::Content::read(f).expect("read the GGUF header")
}

/// Panics with a clear message when `m`'s smallest gap is below [`MIN_MARGIN`]: the answer `what`
/// checks is then a near-tie that may flip between CPU kinds or engines, so the test's prompt must
/// change (not the expected answer).
pub fn assert_margin(m: &Margin, what: &str) {
    let min = m.min();
    assert!(
        min >= MIN_MARGIN,
        "{what}: the greedy answer {:?} is a near-tie (top-1 − top-2 logit {min:.3} < {MIN_MARGIN} \
         at step {:?}; gaps {:?}); it may differ between CPU kinds and engines — pick a prompt \
         with a larger margin instead of changing the expected answer",
        m.text,
        m.argmin(),
        m.gaps
    );
}

/// System message of [`wide_margin_chat`]. (With SmolLM2's default system message instead, the
/// same question's smallest greedy gap is 0.82 on our engine, and a near-tie on other CPUs.)
pub const WIDE_MARGIN_SYSTEM: &str = "You are a helpful assistant.";
/// User message of [`wide_margin_chat`].
pub const WIDE_MARGIN_USER: &str = "What is the capital of France? Answer in one sentence.";
/// A plain-text completion prompt with a large greedy margin (≥ 3.0 over 8 tokens on SmolLM2).
pub const WIDE_MARGIN_COMPLETION: &str = "1, 2, 3, 4, 5,";

/// A chat whose greedy SmolLM2 answer has a large margin (measured 1.11 over its 8 steps, EOS
/// included) and ends at EOS: [`WIDE_MARGIN_SYSTEM`] + [`WIDE_MARGIN_USER`].
pub fn wide_margin_chat() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", WIDE_MARGIN_SYSTEM),
        ChatMessage::new("user", WIDE_MARGIN_USER),
    ]
}
