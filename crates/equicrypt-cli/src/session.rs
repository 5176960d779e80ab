//! Loading what a key holder needs: key, encrypted engine, plaintext tokenizer and chat template,
//! with the key checked against the model before anything runs.

use std::path::Path;

use anyhow::{Context, Result};
use equicrypt_client::{ChatMessage, ChatTemplate, CipherSession, ClientError, GgufTokenizer};
use equicrypt_core::{SecretKey, VocabPermutation};
use equicrypt_engine::LlamaModel;
use equicrypt_model::{EncryptedModelInfo, GgufFile};

/// A key with the plaintext model and its encrypted counterpart (the inputs of `verify`, `bench`).
#[derive(clap::Args)]
pub struct ModelPair {
    /// Key file.
    #[arg(long)]
    pub key: std::path::PathBuf,
    /// Plaintext GGUF (`verify --engine transformers`: a transformers checkpoint directory).
    #[arg(long)]
    pub plain: std::path::PathBuf,
    /// Encrypted GGUF (`verify --engine transformers`: an encrypted checkpoint directory).
    #[arg(long)]
    pub encrypted: std::path::PathBuf,
}

/// Opens an encrypted model and checks that `key` is its key.
pub fn load_encrypted(path: &Path, key: &SecretKey) -> Result<LlamaModel> {
    let f = GgufFile::open(path)?;
    EncryptedModelInfo::read(&f)?.check_key(key)?;
    drop(f);
    LlamaModel::load(path).with_context(|| format!("cannot load {}", path.display()))
}

/// Opens a plaintext model (refusing an encrypted one).
pub fn load_plain(path: &Path) -> Result<LlamaModel> {
    let f = GgufFile::open(path)?;
    if equicrypt_model::is_encrypted(&f) {
        anyhow::bail!(
            "{} is an encrypted model; expected the plaintext one",
            path.display()
        );
    }
    drop(f);
    LlamaModel::load(path).with_context(|| format!("cannot load {}", path.display()))
}

/// Tokenizer, chat template and id cipher built from the plaintext model: a GGUF's metadata or a
/// transformers checkpoint directory's tokenizer files.
pub struct ClientSide {
    /// Tokenizer plus vocabulary permutation.
    pub cipher: CipherSession,
    /// The model's chat template, when it has one.
    pub template: Option<ChatTemplate>,
}

impl ClientSide {
    /// Builds the client side from the plaintext model at `tokenizer_path`: a GGUF file, or a
    /// Hugging Face transformers checkpoint directory (`config.json`, `tokenizer.json`, ...).
    pub fn load(tokenizer_path: &Path, key: &SecretKey) -> Result<Self> {
        Self::load_session(tokenizer_path, key, None)
    }

    /// Like [`ClientSide::load`]; with a session label, ids are encrypted with the session's
    /// composed permutation `σ_s ∘ π` (for a model written by `equicrypt rekey`).
    pub fn load_session(
        tokenizer_path: &Path,
        key: &SecretKey,
        session: Option<&str>,
    ) -> Result<Self> {
        let (tok, template) = if tokenizer_path.is_dir() {
            load_hf_dir(tokenizer_path)?
        } else {
            let f = GgufFile::open(tokenizer_path)?;
            if equicrypt_model::is_encrypted(&f) {
                anyhow::bail!(
                    "{} is an encrypted model: --tokenizer needs the plaintext model (it holds the vocabulary)",
                    tokenizer_path.display()
                );
            }
            let tok = GgufTokenizer::from_content(&f.content).with_context(|| {
                format!("{}: cannot build the tokenizer", tokenizer_path.display())
            })?;
            let template = ChatTemplate::from_content(&f.content).ok();
            (tok, template)
        };
        let cipher = match session {
            None => CipherSession::from_key(tok, key),
            Some(label) => {
                let perm = VocabPermutation::derive_session(key, label, tok.vocab_size())?;
                CipherSession::new(tok, perm)?
            }
        };
        Ok(Self { cipher, template })
    }

    /// The text to tokenize for `prompt`: the chat template applied to one user turn, or the raw
    /// prompt when `raw` is set or the model has no template.
    pub fn prompt_text(&self, prompt: &str, raw: bool) -> Result<String> {
        match (&self.template, raw) {
            (Some(t), false) => Ok(t.render(&[ChatMessage::new("user", prompt)], true)?),
            _ => Ok(prompt.to_string()),
        }
    }
}

/// Tokenizer and chat template of a plaintext transformers checkpoint directory (errors name the
/// file; a template that does not compile is dropped, as for a GGUF).
fn load_hf_dir(dir: &Path) -> Result<(GgufTokenizer, Option<ChatTemplate>)> {
    let tok = match GgufTokenizer::from_hf_dir(dir) {
        Ok(tok) => tok,
        Err(ClientError::EncryptedHfCheckpoint { .. }) => anyhow::bail!(
            "{} is an encrypted checkpoint: --tokenizer needs the plaintext model (it holds the vocabulary)",
            dir.display()
        ),
        Err(e) => return Err(e.into()),
    };
    let template = ChatTemplate::from_hf_dir(dir, &tok).ok().flatten();
    Ok((tok, template))
}

/// Errors unless the model at `path` is the session model of `session` (or, with `None`, not a
/// session model): the wrong permutation would turn every id into a different token.
pub fn check_session(path: &Path, session: Option<&str>) -> Result<()> {
    let f = GgufFile::open(path)?;
    let have = equicrypt_model::rekey::session_label(&f);
    match (have.as_deref(), session) {
        (Some(a), Some(b)) if a == b => Ok(()),
        (None, None) => Ok(()),
        (Some(a), None) => anyhow::bail!(
            "{} is the session model of '{a}': pass --session {a}",
            path.display()
        ),
        (None, Some(b)) => anyhow::bail!(
            "{} is not a session model, but --session {b} was given (re-key it with `equicrypt rekey`)",
            path.display()
        ),
        (Some(a), Some(b)) => anyhow::bail!(
            "{} is the session model of '{a}', not of '{b}'",
            path.display()
        ),
    }
}
