//! The audit's scenario: what the attacker knows (public text, the public tokenizer and chat
//! template) and what the victim sends (conversations the attacker intercepts, held-out prompts).
//!
//! Public text is the Brown corpus minus its fiction genres; the victim's conversations are the
//! fiction genres, so attacker statistics and traffic never share a sentence. A conversation turn
//! is a user paragraph rendered with the model's public chat template (the prompt) and the next
//! paragraph as the answer, ended by EOS (the completion).

use std::io::{BufRead, Write};
use std::path::Path;

use equicrypt_client::{ChatMessage, ChatTemplate, GgufTokenizer};
use serde::{Deserialize, Serialize};

use crate::corpus::BrownDocument;
use crate::AuditError;

type Result<T, E = AuditError> = std::result::Result<T, E>;

/// Brown genres held out as the victim's conversations.
pub const HELD_OUT_GENRES: [&str; 6] = [
    "fiction",
    "mystery",
    "science_fiction",
    "adventure",
    "romance",
    "humor",
];

/// The public tokenizer and chat template.
pub struct PublicText {
    /// Tokenizer of the base model (public).
    pub tok: GgufTokenizer,
    /// Chat template of the base model (public), if any.
    pub template: Option<ChatTemplate>,
}

impl PublicText {
    /// Plaintext ids of one user turn as the client would send it.
    pub fn prompt(&self, text: &str) -> Result<Vec<u32>> {
        let rendered = match &self.template {
            Some(t) => t.render(&[ChatMessage::new("user", text)], true)?,
            None => text.to_string(),
        };
        Ok(self.tok.encode(&rendered, true)?)
    }

    /// Plaintext ids of an answer, ended by EOS when the tokenizer has one.
    pub fn completion(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.tok.encode(text, false)?;
        ids.extend(self.tok.eos_id());
        Ok(ids)
    }

    /// Conversation turns from consecutive paragraph pairs of `docs`, up to `max_tokens`.
    pub fn conversations(&self, docs: &[BrownDocument], max_tokens: usize) -> Result<Traffic> {
        let mut t = Traffic::default();
        let mut total = 0usize;
        'docs: for d in docs {
            for pair in d.paragraphs.chunks_exact(2) {
                if total >= max_tokens {
                    break 'docs;
                }
                let p = self.prompt(&pair[0])?;
                let c = self.completion(&pair[1])?;
                total += p.len() + c.len();
                t.prompts.push(p);
                t.completions.push(c);
            }
        }
        Ok(t)
    }

    /// The held-out prompt set the token-weighted score is measured on: every non-empty line of
    /// `prompts` (the CLI's `data/prompts.txt`) as a chat turn, plus `eval_text` (its
    /// `data/eval.txt`).
    pub fn held_out_prompts(&self, eval_text: &str, prompts: &str) -> Result<Vec<u32>> {
        let mut ids = self.tok.encode(eval_text, false)?;
        for p in prompts.lines().filter(|l| !l.trim().is_empty()) {
            ids.extend(self.prompt(p)?);
        }
        Ok(ids)
    }
}

/// Intercepted id streams: prompts (client → server) and completions (server → client).
#[derive(Clone, Debug, Default)]
pub struct Traffic {
    /// Prompt id streams.
    pub prompts: Vec<Vec<u32>>,
    /// Completion id streams.
    pub completions: Vec<Vec<u32>>,
}

/// One line of a traffic log.
#[derive(Serialize, Deserialize)]
struct TrafficLine {
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion: Option<Vec<u32>>,
}

impl Traffic {
    /// Every stream, prompts first.
    pub fn streams(&self) -> Vec<Vec<u32>> {
        self.prompts
            .iter()
            .chain(&self.completions)
            .cloned()
            .collect()
    }

    /// Total ids.
    pub fn tokens(&self) -> usize {
        self.prompts
            .iter()
            .chain(&self.completions)
            .map(Vec::len)
            .sum()
    }

    /// Every id, in stream order.
    pub fn all_ids(&self) -> Vec<u32> {
        self.prompts
            .iter()
            .chain(&self.completions)
            .flatten()
            .copied()
            .collect()
    }

    /// Maps every id through `f`.
    pub fn map(&self, f: impl Fn(u32) -> u32) -> Traffic {
        let m = |v: &Vec<Vec<u32>>| {
            v.iter()
                .map(|s| s.iter().map(|&i| f(i)).collect())
                .collect()
        };
        Traffic {
            prompts: m(&self.prompts),
            completions: m(&self.completions),
        }
    }

    /// Reads a traffic log: one JSON object per line with a `prompt` and/or a `completion`
    /// array of ciphertext ids (a `/completion` request body has the `prompt` field already).
    pub fn read(path: &Path, vocab: usize) -> Result<Traffic> {
        let f = std::fs::File::open(path).map_err(|source| AuditError::Io {
            message: format!("cannot open traffic log {}", path.display()),
            source,
        })?;
        let mut t = Traffic::default();
        for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|source| AuditError::Io {
                message: format!("{}: cannot read", path.display()),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let l: TrafficLine =
                serde_json::from_str(&line).map_err(|source| AuditError::TrafficFormat {
                    path: path.to_path_buf(),
                    line: n + 1,
                    source,
                })?;
            for (v, out) in [
                (l.prompt, &mut t.prompts),
                (l.completion, &mut t.completions),
            ] {
                if let Some(v) = v {
                    if let Some(&id) = v.iter().find(|&&i| i as usize >= vocab) {
                        return Err(AuditError::TrafficId {
                            path: path.to_path_buf(),
                            line: n + 1,
                            id,
                            vocab,
                        });
                    }
                    out.push(v);
                }
            }
        }
        if t.tokens() == 0 {
            return Err(AuditError::TrafficEmpty {
                path: path.to_path_buf(),
            });
        }
        Ok(t)
    }

    /// Writes the log format [`Traffic::read`] reads.
    pub fn write(&self, path: &Path) -> Result<()> {
        let io = |message: String| move |source| AuditError::Io { message, source };
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(path).map_err(io(format!("cannot create {}", path.display())))?,
        );
        for p in &self.prompts {
            let l = TrafficLine {
                prompt: Some(p.clone()),
                completion: None,
            };
            writeln!(out, "{}", serde_json::to_string(&l)?)
                .map_err(io(format!("cannot write {}", path.display())))?;
        }
        for c in &self.completions {
            let l = TrafficLine {
                prompt: None,
                completion: Some(c.clone()),
            };
            writeln!(out, "{}", serde_json::to_string(&l)?)
                .map_err(io(format!("cannot write {}", path.display())))?;
        }
        out.flush()
            .map_err(io(format!("cannot write {}", path.display())))?;
        Ok(())
    }
}

/// Most frequent first id of the prompts and last id of the completions: what traffic alone
/// says about the chat-start and end-of-generation ids.
pub fn special_ids_from_traffic(t: &Traffic) -> (Option<u32>, Option<u32>) {
    let mode = |ids: Vec<u32>| -> Option<u32> {
        let mut counts = std::collections::HashMap::<u32, usize>::new();
        for i in ids {
            *counts.entry(i).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by_key(|&(id, n)| (n, std::cmp::Reverse(id)))
            .map(|(id, _)| id)
    };
    (
        mode(
            t.prompts
                .iter()
                .filter_map(|s| s.first().copied())
                .collect(),
        ),
        mode(
            t.completions
                .iter()
                .filter_map(|s| s.last().copied())
                .collect(),
        ),
    )
}
