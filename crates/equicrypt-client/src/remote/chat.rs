//! The blind-chat flow: the prompt is tokenized and encrypted here, the server generates from
//! ciphertext ids only, and the streamed ids are decrypted here ([`BlindChat`]).

use equicrypt_protocol::{CompletionRequest, StopType, Timings};

use super::llamacpp;
use super::token_stream::StreamEvent;
use super::transport::RemoteClient;
use crate::session::CipherSession;
use crate::{CipherStreamDecoder, Result};

/// Sampling and length settings of [`BlindChat::generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Softmax temperature (≤ 0: greedy).
    pub temperature: f32,
    /// Top-k (0: off).
    pub top_k: usize,
    /// Top-p (1: off).
    pub top_p: f32,
    /// Sampling seed (llama-server uses its low 32 bits).
    pub seed: u64,
    /// Repetition penalty (1: off).
    pub repeat_penalty: f32,
    /// Window of the repetition penalty.
    pub repeat_last_n: usize,
    /// Tokenize special-token text in the prompt (`<|im_start|>` ...) as special tokens; true for
    /// a rendered chat template.
    pub parse_special: bool,
    /// Render control tokens in the decrypted text.
    pub render_special: bool,
    /// Send no stop ids (and, except to llama-server, `ignore_eos: true`); stop by watching the
    /// decrypted stream and dropping the connection instead (see the module docs, "Hidden stop
    /// ids").
    pub hide_stop_ids: bool,
}

impl Default for GenerateParams {
    /// The protocol's defaults: 128 tokens, temperature 0.8, top-k 40, top-p 0.95, seed 0.
    fn default() -> Self {
        Self {
            max_tokens: equicrypt_protocol::DEFAULT_N_PREDICT,
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed: 0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            parse_special: true,
            render_special: false,
            hide_stop_ids: false,
        }
    }
}

impl GenerateParams {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            temperature: 0.0,
            top_k: 1,
            top_p: 1.0,
            ..Self::default()
        }
    }
}

/// What [`BlindChat::generate`] produced.
#[derive(Clone, Debug, PartialEq)]
pub struct BlindOutput {
    /// The decrypted answer.
    pub text: String,
    /// Plaintext ids of the answer (no stop id).
    pub plain_ids: Vec<u32>,
    /// Ciphertext ids the server produced (no stop id).
    pub cipher_ids: Vec<u32>,
    /// Why generation ended.
    pub stop_type: StopType,
    /// The prompt as the server saw it.
    pub prompt_cipher_ids: Vec<u32>,
    /// Server timings, when reported.
    pub timings: Option<Timings>,
}

/// Blind generation: the prompt is tokenized and encrypted here, the server only sees ciphertext
/// ids, and the streamed ids are decrypted here.
///
/// Check the server's key first with [`RemoteClient::check_fingerprint`]; `BlindChat` does not
/// hold the key's fingerprint.
#[derive(Clone, Copy, Debug)]
pub struct BlindChat<'a> {
    session: &'a CipherSession,
    client: &'a RemoteClient,
}

impl<'a> BlindChat<'a> {
    /// Pairs a cipher session with a server.
    pub fn new(session: &'a CipherSession, client: &'a RemoteClient) -> Self {
        Self { session, client }
    }

    /// Encrypts `prompt_text` (already rendered with the chat template, if any), streams the
    /// completion, and calls `on_text(piece, cipher_ids)` for every server event with the
    /// plaintext that became complete (possibly empty: UTF-8 is buffered) and that event's
    /// ciphertext ids; a final flush of buffered bytes comes with no ids. The session's
    /// end-of-generation ids are the stop ids: sent to the server, or with
    /// [`GenerateParams::hide_stop_ids`] only watched for here.
    pub async fn generate(
        &self,
        prompt_text: &str,
        params: GenerateParams,
        mut on_text: impl FnMut(&str, &[u32]),
    ) -> Result<BlindOutput> {
        let prompt_cipher_ids = self
            .session
            .encrypt_prompt(prompt_text, params.parse_special)?;
        let eog = self.session.eog_cipher_ids()?;
        // llama-server turns `ignore_eos` into a −∞ bias on the id it takes for EOS, and with a
        // file that names no EOS that is an ordinary token (llama.cpp's default id): banning it
        // would change the answer. So llama-server is left to stop there, and the client
        // continues past a stop that is not one of its own (see the module docs).
        let continue_past_server_stops =
            llamacpp::continues_past_server_stops(&params, self.client.backend());
        let mut req = request(
            &params,
            prompt_cipher_ids.clone(),
            &eog,
            continue_past_server_stops,
        );
        let mut dec = self.session.decrypt_stream(params.render_special);
        let mut out = BlindOutput {
            text: String::new(),
            plain_ids: Vec::new(),
            cipher_ids: Vec::new(),
            stop_type: StopType::None,
            prompt_cipher_ids,
            timings: None,
        };
        loop {
            let before = out.cipher_ids.len();
            let ended_at_stop_id = self
                .stream_into(&req, &eog, &mut dec, &mut out, &mut on_text)
                .await?;
            if !(continue_past_server_stops
                && llamacpp::continue_after_server_stop(
                    &mut req,
                    &mut out,
                    before,
                    ended_at_stop_id,
                    params.max_tokens,
                ))
            {
                break;
            }
        }
        let tail = dec.finish();
        if !tail.is_empty() {
            out.text.push_str(&tail);
            on_text(&tail, &[]);
        }
        Ok(out)
    }

    /// One streamed request: decrypts every event's ids into `out` and hands the pieces to
    /// `on_text`, stopping at `eog`; returns whether the stream ended at one of them.
    async fn stream_into(
        &self,
        req: &CompletionRequest,
        eog: &[u32],
        dec: &mut CipherStreamDecoder<'_>,
        out: &mut BlindOutput,
        on_text: &mut impl FnMut(&str, &[u32]),
    ) -> Result<bool> {
        let mut stream = self.client.complete_stream_stopping_at(req, eog).await?;
        while let Some(ev) = stream.next().await? {
            match ev {
                StreamEvent::Tokens(ids) => {
                    let mut piece = String::new();
                    for &cid in &ids {
                        let (pid, text) = dec.push_with_id(cid)?;
                        out.plain_ids.push(pid);
                        piece.push_str(&text);
                    }
                    out.cipher_ids.extend_from_slice(&ids);
                    out.text.push_str(&piece);
                    on_text(&piece, &ids);
                }
                StreamEvent::Done {
                    stop_type, timings, ..
                } => {
                    out.stop_type = stop_type;
                    out.timings = timings;
                }
            }
        }
        Ok(stream.ended_at_stop_id())
    }
}

/// The streamed request of a blind generation: `eog` as stop ids, or with hidden stop ids none
/// and `ignore_eos` (except where the client continues past server stops instead).
fn request(
    params: &GenerateParams,
    prompt: Vec<u32>,
    eog: &[u32],
    continue_past_server_stops: bool,
) -> CompletionRequest {
    CompletionRequest {
        prompt,
        n_predict: i64::try_from(params.max_tokens).unwrap_or(i64::MAX),
        temperature: params.temperature,
        top_k: params.top_k,
        top_p: params.top_p,
        seed: params.seed,
        repeat_penalty: params.repeat_penalty,
        repeat_last_n: params.repeat_last_n,
        stop_ids: if params.hide_stop_ids {
            Vec::new()
        } else {
            eog.to_vec()
        },
        ignore_eos: params.hide_stop_ids && !continue_past_server_stops,
        stream: true,
        n_probs: 0,
        return_tokens: Some(true),
        cache_prompt: None,
    }
}
