//! OpenAI request and response shapes (the subset the proxy implements).

use equicrypt_client::remote::GenerateParams;
use serde::Deserialize;
use serde_json::{json, Value};

/// Default `max_tokens`.
const DEFAULT_MAX_TOKENS: usize = 256;

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Text content: a string, `null` (empty), or an array of `{"type": "text", "text": …}`
    /// parts (concatenated; other part types are refused).
    #[serde(deserialize_with = "content_text")]
    pub content: String,
}

/// OpenAI message content as text.
fn content_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for p in &parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(D::Error::custom(format!(
                            "content part of type {} is not supported (text only)",
                            kind.unwrap_or("?")
                        )))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(D::Error::custom(
            "content must be a string or an array of text parts",
        )),
    }
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with usage counts.
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct Sampling {
    /// Model name (informational).
    #[serde(default)]
    pub model: Option<String>,
    /// Maximum tokens to generate.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Newer name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    /// Temperature (OpenAI default 1).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Top-p.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop strings (unsupported unless empty).
    #[serde(default)]
    pub stop: Option<Value>,
    /// Number of choices (only 1).
    #[serde(default)]
    pub n: Option<usize>,
    /// Stream the answer.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

impl Sampling {
    /// Whether a final usage chunk was asked for (`stream_options.include_usage`).
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    fn validate(&self) -> Result<(), String> {
        if self.n.is_some_and(|n| n != 1) {
            return Err("only n = 1 is supported".into());
        }
        match &self.stop {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => return Err(
                "stop strings are not supported (the model's end-of-turn tokens stop generation)"
                    .into(),
            ),
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(format!("temperature {t} is outside [0, 2]"));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top_p {p} is outside (0, 1]"));
            }
        }
        if self.max_tokens.or(self.max_completion_tokens) == Some(0) {
            return Err("max_tokens must be at least 1".into());
        }
        Ok(())
    }

    fn params(&self, parse_special: bool) -> GenerateParams {
        let mut p = GenerateParams {
            parse_special,
            render_special: false,
            ..GenerateParams::default()
        };
        p.max_tokens = self
            .max_tokens
            .or(self.max_completion_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS);
        p.temperature = self.temperature.unwrap_or(1.0);
        p.top_p = self.top_p.unwrap_or(1.0);
        p.top_k = 0;
        p.seed = self.seed.unwrap_or(0);
        p
    }
}

/// `POST /v1/chat/completions` request.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Sampling and streaming fields.
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl ChatCompletionRequest {
    /// Checks the fields the proxy cannot honour.
    pub fn validate(&self) -> Result<(), String> {
        if self.messages.is_empty() {
            return Err("messages must not be empty".into());
        }
        self.sampling.validate()
    }

    /// Generation parameters (the rendered chat template's special tokens are parsed).
    pub fn params(&self) -> GenerateParams {
        self.sampling.params(true)
    }
}

/// `POST /v1/completions` request (plaintext prompt; the proxy tokenizes it).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Prompt text.
    pub prompt: String,
    /// Sampling and streaming fields.
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl CompletionRequest {
    /// Checks the fields the proxy cannot honour.
    pub fn validate(&self) -> Result<(), String> {
        if self.prompt.is_empty() {
            return Err("prompt must not be empty".into());
        }
        self.sampling.validate()
    }

    /// Generation parameters (a plaintext prompt's special-token text stays text).
    pub fn params(&self) -> GenerateParams {
        self.sampling.params(false)
    }
}

/// OpenAI `usage` object.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// A non-streamed chat completion.
pub fn chat_response(
    id: &str,
    created: u64,
    model: &str,
    text: String,
    finish: &str,
    usage: Value,
) -> Value {
    json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": usage,
    })
}

/// A non-streamed text completion.
pub fn text_response(
    id: &str,
    created: u64,
    model: &str,
    text: String,
    finish: &str,
    usage: Value,
) -> Value {
    json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}],
        "usage": usage,
    })
}

/// One streamed chat chunk.
pub fn chat_chunk(
    id: &str,
    created: u64,
    model: &str,
    role: Option<&str>,
    content: Option<&str>,
    finish: Option<&str>,
) -> Value {
    let mut delta = serde_json::Map::new();
    if let Some(r) = role {
        delta.insert("role".into(), json!(r));
        delta.insert("content".into(), json!(""));
    }
    if let Some(c) = content {
        delta.insert("content".into(), json!(c));
    }
    json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    })
}

/// One streamed text-completion chunk.
pub fn text_chunk(id: &str, created: u64, model: &str, text: &str, finish: Option<&str>) -> Value {
    json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}],
    })
}

/// The final usage-only chunk (`stream_options.include_usage`).
pub fn usage_chunk(id: &str, created: u64, model: &str, chat: bool, usage: Value) -> Value {
    json!({
        "id": id, "object": if chat { "chat.completion.chunk" } else { "text_completion" },
        "created": created, "model": model, "choices": [], "usage": usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(v: Value) -> Result<ChatCompletionRequest, String> {
        let r: ChatCompletionRequest = serde_json::from_value(v).map_err(|e| e.to_string())?;
        r.validate()?;
        Ok(r)
    }

    #[test]
    fn content_may_be_a_string_null_or_text_parts() {
        let r = chat(json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]},
            {"role": "assistant", "content": null},
        ]}))
        .unwrap();
        let c: Vec<&str> = r.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(c, ["Be brief.", "Hello, world", ""]);
        let e = chat(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}))
        .unwrap_err();
        assert!(e.contains("image_url"), "{e}");
        assert!(chat(json!({"messages": [{"role": "user", "content": 3}]})).is_err());
    }

    #[test]
    fn unsupported_fields_are_refused() {
        let m = json!([{"role": "user", "content": "hi"}]);
        assert!(chat(json!({"messages": []}))
            .unwrap_err()
            .contains("messages"));
        assert!(chat(json!({"messages": m, "n": 2}))
            .unwrap_err()
            .contains("n = 1"));
        assert!(chat(json!({"messages": m, "stop": "x"}))
            .unwrap_err()
            .contains("stop"));
        assert!(chat(json!({"messages": m, "stop": ["x"]})).is_err());
        assert!(chat(json!({"messages": m, "stop": []})).is_ok());
        assert!(chat(json!({"messages": m, "temperature": 2.5})).is_err());
        assert!(chat(json!({"messages": m, "top_p": 0})).is_err());
        assert!(chat(json!({"messages": m, "max_tokens": 0})).is_err());
    }

    #[test]
    fn sampling_fields_map_to_generation_params() {
        // Integers where floats are expected (as the openai package sends `temperature=0`).
        let r = chat(json!({"messages": [{"role": "user", "content": "hi"}],
            "temperature": 0, "top_p": 1, "max_completion_tokens": 5, "seed": 7,
            "stream": true, "stream_options": {"include_usage": true}, "user": "ignored"}))
        .unwrap();
        let p = r.params();
        assert_eq!(
            (p.temperature, p.top_p, p.max_tokens, p.seed),
            (0.0, 1.0, 5, 7)
        );
        assert!(p.parse_special && r.sampling.stream && r.sampling.include_usage());
        let c: CompletionRequest =
            serde_json::from_value(json!({"prompt": "<|im_start|>"})).unwrap();
        c.validate().unwrap();
        assert!(
            !c.params().parse_special,
            "a plaintext prompt's special-token text stays text"
        );
        assert_eq!(c.params().max_tokens, DEFAULT_MAX_TOKENS);
    }
}
