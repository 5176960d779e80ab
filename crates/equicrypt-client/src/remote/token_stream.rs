//! A streamed completion read event by event: server-sent events ([`super::sse`]) normalized into
//! [`StreamEvent`]s, with the client-side stop at stop ids (dropping the connection cancels the
//! job) and the wait for llama-server's final event after its own EOS.

use std::collections::VecDeque;

use equicrypt_protocol::{StopType, Timings};
use futures_util::stream::{self, BoxStream, StreamExt};
use serde_json::Value;

use super::sse::{SseEvent, SseParser};
use super::transport::{is_stop, normalize, server_error_from_value, sorted, Backend};
use crate::{ClientError, Result};

/// One event of a streamed completion.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    /// Newly generated ciphertext ids (never empty, never a stop id).
    Tokens(Vec<u32>),
    /// Generation ended; nothing follows.
    Done {
        /// Why it ended ([`StopType::Eos`] also when the client stopped at a stop id itself).
        stop_type: StopType,
        /// Server timings, when the server sent its final event.
        timings: Option<Timings>,
        /// Tokens generated according to the server's final event; when the client found a stop
        /// id among the ids (it stopped itself, or llama-server streamed its EOS), the number of
        /// ids delivered.
        tokens_predicted: usize,
    },
}

/// A streamed completion: read with [`TokenStream::next`] until it returns `Ok(None)`.
///
/// Dropping it closes the connection, which makes the server stop generating.
pub struct TokenStream {
    body: BoxStream<'static, Result<Vec<u8>>>,
    parser: SseParser,
    queue: VecDeque<StreamEvent>,
    backend: Backend,
    stops: Vec<u32>,
    delivered: usize,
    /// The server stops by itself after this id (llama-server's EOS): after it, further ids are
    /// dropped and the final event is awaited instead of closing the connection.
    pub(super) server_eos: Option<u32>,
    /// Saw `server_eos`; waiting for the final event.
    draining: bool,
    /// A `Done` was queued: no further server events are read.
    done: bool,
    /// The stream ended at one of its stop ids (not at a stop of the server's own).
    at_stop_id: bool,
    /// Nothing more will be returned (after `Done` or an error).
    finished: bool,
}

impl std::fmt::Debug for TokenStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStream")
            .field("backend", &self.backend)
            .field("stops", &self.stops)
            .field("delivered", &self.delivered)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl TokenStream {
    /// A stream over raw response-body chunks (the HTTP layer, or a test's byte source).
    pub fn from_chunks(
        body: BoxStream<'static, Result<Vec<u8>>>,
        backend: Backend,
        stop_ids: &[u32],
    ) -> Self {
        Self::new(body, backend, stop_ids)
    }

    pub(super) fn new(
        body: BoxStream<'static, Result<Vec<u8>>>,
        backend: Backend,
        stop_ids: &[u32],
    ) -> Self {
        Self {
            body,
            parser: SseParser::new(),
            queue: VecDeque::new(),
            backend,
            stops: sorted(stop_ids),
            delivered: 0,
            server_eos: None,
            draining: false,
            done: false,
            at_stop_id: false,
            finished: false,
        }
    }

    /// The next event: `Ok(Some(Tokens))` any number of times, then `Ok(Some(Done))`, then
    /// `Ok(None)`. An error (transport, server error event, malformed event, stream cut before
    /// the final event) ends the stream: later calls return `Ok(None)`.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                if matches!(ev, StreamEvent::Done { .. }) {
                    self.close();
                }
                return Ok(Some(ev));
            }
            if self.finished {
                return Ok(None);
            }
            let res = match self.body.next().await {
                Some(Ok(chunk)) => self.feed(&chunk),
                Some(Err(e)) => Err(e),
                None => self.end_of_body(),
            };
            if let Err(e) = res {
                self.close();
                self.queue.clear();
                return Err(e);
            }
        }
    }

    /// Whether the stream ended at one of its stop ids, rather than at a stop the server made by
    /// itself (its own EOS, the length limit) or not yet at all.
    pub fn ended_at_stop_id(&self) -> bool {
        self.at_stop_id
    }

    fn close(&mut self) {
        self.finished = true;
        self.body = stream::empty().boxed();
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<()> {
        for ev in self.parser.push(chunk)? {
            if self.done {
                break;
            }
            self.handle(ev)?;
        }
        Ok(())
    }

    fn end_of_body(&mut self) -> Result<()> {
        let truncated = self.parser.finish()?;
        if self.done {
            return Ok(());
        }
        Err(ClientError::MalformedResponse(format!(
            "event stream ended before the final event{}",
            if truncated {
                " (inside an unterminated event)"
            } else {
                ""
            }
        )))
    }

    fn handle(&mut self, ev: SseEvent) -> Result<()> {
        let data = ev.data.trim();
        if data == "[DONE]" {
            // OpenAI-style terminator: only acceptable after the final event.
            return Err(ClientError::MalformedResponse(
                "event stream ended ([DONE]) before the final event".into(),
            ));
        }
        let v: Value = serde_json::from_str(data).map_err(|e| {
            ClientError::MalformedResponse(format!("server-sent event is not JSON: {e}"))
        })?;
        if ev.event.as_deref() == Some("error") {
            return Err(server_error_from_value(500, v.get("error").unwrap_or(&v)));
        }
        let resp = normalize(self.backend, v)?;
        if self.draining {
            if resp.stop {
                self.at_stop_id = true;
                self.finish(StopType::Eos, resp.timings, self.delivered);
            }
            return Ok(());
        }
        if let Some(i) = resp.tokens.iter().position(|t| is_stop(&self.stops, *t)) {
            if i > 0 {
                self.delivered += i;
                self.queue
                    .push_back(StreamEvent::Tokens(resp.tokens[..i].to_vec()));
            }
            if Some(resp.tokens[i]) == self.server_eos && !resp.stop {
                // The server ends here by itself: read on to its final event.
                self.draining = true;
                return Ok(());
            }
            self.at_stop_id = true;
            self.finish(StopType::Eos, resp.timings, self.delivered);
            return Ok(());
        }
        if !resp.tokens.is_empty() {
            self.delivered += resp.tokens.len();
            self.queue.push_back(StreamEvent::Tokens(resp.tokens));
        }
        if resp.stop {
            // vLLM's chunks count nothing: its final chunk says only why it stopped.
            let predicted = match self.backend {
                Backend::Vllm => self.delivered,
                Backend::Equicrypt | Backend::LlamaCpp => resp.tokens_predicted,
            };
            self.finish(resp.stop_type, resp.timings, predicted);
        }
        Ok(())
    }

    /// Queues the final event; nothing is read after it.
    fn finish(&mut self, stop_type: StopType, timings: Option<Timings>, tokens_predicted: usize) {
        self.queue.push_back(StreamEvent::Done {
            stop_type,
            timings,
            tokens_predicted,
        });
        self.done = true;
    }
}
