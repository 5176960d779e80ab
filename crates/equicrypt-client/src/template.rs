//! Chat-template rendering (`tokenizer.chat_template`) with minijinja.
//!
//! Settings follow Hugging Face `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on,
//! Python string/dict methods via `minijinja-contrib`'s pycompat callback, a `raise_exception`
//! function, and a `tojson` filter that writes like Python's `json.dumps(..., ensure_ascii=False)`
//! (`", "` / `": "` separators, no HTML escaping); message maps keep field order (`role`, then
//! `content`), like Python dicts.
//!
//! A GGUF without `tokenizer.chat_template` gets its architecture's built-in template when there
//! is one (`builtin_template`), as llama.cpp falls back to its built-in ones: Gemma 3 GGUFs
//! converted from base checkpoints carry none.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::tokenizer::{get, get_str, KEY_BOS, KEY_EOS, KEY_TOKENS};
use crate::{ClientError, Result};

/// GGUF key holding the Jinja chat template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

const TEMPLATE_NAME: &str = "chat_template";

/// Gemma 3's chat template (as in the instruction-tuned Hugging Face checkpoints'
/// `tokenizer_config.json`): `<start_of_turn>user … <end_of_turn>`, the system prompt folded into
/// the first user turn, `assistant` rendered as `model`.
pub const GEMMA3_TEMPLATE: &str = include_str!("templates/gemma3.jinja");

/// The built-in chat template of a GGUF architecture, for files without `tokenizer.chat_template`.
pub fn builtin_template(arch: &str) -> Option<&'static str> {
    match arch {
        "gemma3" => Some(GEMMA3_TEMPLATE),
        _ => None,
    }
}

/// One chat message (`{"role": ..., "content": ...}` in the template).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// Builds a message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template plus the `bos_token` / `eos_token` strings it may reference.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python `json.dumps(v, ensure_ascii=False, indent=indent)`.
fn write_py_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    depth: usize,
) -> std::result::Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&v.to_string()),
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(out, item, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json_str(out, &key.to_string());
                out.push_str(": ");
                write_py_json(out, &v.get_item(key)?, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => write_json_str(out, &v.to_string()),
    }
    Ok(())
}

fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_py_json(&mut out, &value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

fn token_string(md: &HashMap<String, GgufValue>, id_key: &str) -> Result<String> {
    let Some(id) = md.get(id_key) else {
        return Ok(String::new());
    };
    let id = id.to_u32().map_err(|e| ClientError::BadMetadata {
        key: id_key.to_string(),
        reason: e.to_string(),
    })? as usize;
    match get(md, KEY_TOKENS)? {
        GgufValue::Array(items) => match items.get(id) {
            Some(GgufValue::String(s)) => Ok(s.clone()),
            _ => Err(ClientError::BadMetadata {
                key: id_key.to_string(),
                reason: format!("token {id} is not a string in {KEY_TOKENS}"),
            }),
        },
        _ => Err(ClientError::BadMetadata {
            key: KEY_TOKENS.to_string(),
            reason: "expected an array".into(),
        }),
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` / `eos_token` are the strings the template sees.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, String::clone(&source))
            .map_err(|e| ClientError::Template(format!("{e:#}")))?;
        Ok(Self {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// Reads `tokenizer.chat_template` (or the architecture's built-in template) and the
    /// BOS/EOS token texts (empty when their ids are absent) from GGUF metadata.
    pub fn from_metadata(md: &HashMap<String, GgufValue>) -> Result<Self> {
        let builtin = || {
            get_str(md, "general.architecture")
                .ok()
                .and_then(builtin_template)
        };
        let source = match (md.get(CHAT_TEMPLATE_KEY), builtin()) {
            (None, Some(t)) => t,
            _ => get_str(md, CHAT_TEMPLATE_KEY)?,
        };
        Self::new(
            source,
            token_string(md, KEY_BOS)?,
            token_string(md, KEY_EOS)?,
        )
    }

    /// [`from_metadata`](Self::from_metadata) of an already-read GGUF header.
    pub fn from_content(content: &Content) -> Result<Self> {
        Self::from_metadata(&content.metadata)
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation; with `add_generation_prompt` the assistant header is appended.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_extra(messages, add_generation_prompt, Value::UNDEFINED)
    }

    /// Like [`render`](Self::render), with extra top-level variables (e.g. `tools`) merged into
    /// the context; `extra` must be a map or undefined.
    pub fn render_with_extra(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: Value,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ClientError::Template(format!("{e:#}")))?;
        let base = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        let ctx = if extra.is_undefined() {
            base
        } else {
            context! { ..base, ..extra }
        };
        tmpl.render(ctx)
            .map_err(|e| ClientError::Template(format!("{e:#}")))
    }
}
