//! The single worker thread that owns the engine and runs generation jobs one at a time, first come
//! first served, from a bounded queue.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use equicrypt_engine::{apply_repeat_penalty, Engine, EngineError, Sampler, SamplingParams};
use equicrypt_protocol::{PositionProbs, StopType, Timings, TokenProb};
use tokio::sync::mpsc::UnboundedSender;

use crate::Shared;

/// One generation request, validated.
pub(crate) struct Job {
    /// Prompt (ciphertext ids, non-empty, all below the vocabulary size, shorter than the context).
    pub prompt: Vec<u32>,
    /// Most tokens to generate; generation also ends when the context is full.
    pub max_new: usize,
    /// Sampling parameters (validated).
    pub params: SamplingParams,
    /// `stop[id]`: whether `id` ends generation (stop ids and the model's EOS).
    pub stop: Vec<bool>,
    /// Top alternatives to report per position (0: none).
    pub n_probs: usize,
    /// When the job entered the queue.
    pub enqueued: Instant,
    /// Where the worker reports progress; a closed receiver cancels the job.
    pub events: UnboundedSender<Event>,
}

/// What the worker reports about a job.
pub(crate) enum Event {
    /// The worker took the job from the queue.
    Started,
    /// One generated id.
    Token {
        /// The id.
        id: u32,
        /// Its top alternatives (when asked for).
        probs: Option<PositionProbs>,
    },
    /// Generation ended normally.
    Done {
        /// Why.
        stop: StopType,
        /// Timings of the whole job.
        timings: Timings,
    },
    /// The server is shutting down and the job was dropped before it started.
    Cancelled,
    /// The engine failed (message is the engine's, which never contains token ids of the request
    /// except an out-of-range one, and those are rejected before a job is made).
    Failed(String),
}

enum Outcome {
    Done(StopType, usize),
    ClientGone(usize),
}

/// The worker loop: runs until the queue is closed, or the server shuts down and the queue is empty.
pub(crate) fn run<E: Engine>(mut engine: E, jobs: Receiver<Job>, shared: Arc<Shared>) {
    let m = &shared.metrics;
    loop {
        let job = match jobs.recv_timeout(Duration::from_millis(50)) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                if shared.is_shutting_down() {
                    break;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        m.queue_depth.fetch_sub(1, Ordering::Relaxed);
        if job.events.is_closed() {
            m.jobs_cancelled.fetch_add(1, Ordering::Relaxed);
            tracing::info!("job cancelled while queued (client gone)");
            continue;
        }
        if shared.is_shutting_down() {
            let _ = job.events.send(Event::Cancelled);
            tracing::info!("queued job dropped: shutting down");
            continue;
        }
        m.jobs_running.fetch_add(1, Ordering::Relaxed);
        let result = catch_unwind(AssertUnwindSafe(|| run_job(&mut engine, &job, &shared)));
        m.jobs_running.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(Ok(Outcome::Done(stop, n))) => {
                m.jobs_completed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(prompt_tokens = job.prompt.len(), generated = n, stop = ?stop, "job done");
            }
            Ok(Ok(Outcome::ClientGone(n))) => {
                m.jobs_cancelled.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    prompt_tokens = job.prompt.len(),
                    generated = n,
                    "job cancelled (client gone)"
                );
            }
            Ok(Err(e)) => {
                m.jobs_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(kind = error_kind(&e), "job failed");
                let _ = job.events.send(Event::Failed(e.to_string()));
            }
            Err(_) => {
                m.jobs_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!("job panicked; engine reset");
                let _ = job.events.send(Event::Failed("engine panicked".into()));
                engine.reset();
            }
        }
    }
    tracing::info!("worker stopped");
}

/// A name for an engine error that carries no request data.
fn error_kind(e: &EngineError) -> &'static str {
    match e {
        EngineError::Io(_) => "io",
        EngineError::Candle(_) => "candle",
        EngineError::TokenOutOfRange { .. } => "token_out_of_range",
        EngineError::ContextOverflow { .. } => "context_overflow",
        EngineError::EmptyInput => "empty_input",
        EngineError::InvalidLogits(_) => "invalid_logits",
        EngineError::InvalidSamplingParams(_) => "invalid_sampling_params",
        _ => "other",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs one job; the same sequence of engine and sampler calls as [`equicrypt_engine::generate`],
/// so the ids are the same for the same parameters.
fn run_job<E: Engine>(engine: &mut E, job: &Job, shared: &Shared) -> Result<Outcome, EngineError> {
    let m = &shared.metrics;
    let queue_ms = ms(job.enqueued.elapsed());
    if job.events.send(Event::Started).is_err() {
        return Ok(Outcome::ClientGone(0));
    }
    engine.reset();
    let mut sampler = Sampler::new(job.params.clone())?;
    // The sampler's repetition window, mirrored for the reported logprobs.
    let window = job.params.repeat_last_n;
    let mut recent: VecDeque<u32> = VecDeque::new();
    let accept = |sampler: &mut Sampler, recent: &mut VecDeque<u32>, id: u32| {
        sampler.accept(id);
        if job.n_probs > 0 && window > 0 {
            if recent.len() == window {
                recent.pop_front();
            }
            recent.push_back(id);
        }
    };
    for &id in &job.prompt {
        accept(&mut sampler, &mut recent, id);
    }
    let mut timings = Timings {
        prompt_n: job.prompt.len(),
        queue_ms,
        ..Timings::default()
    };
    let finish = |timings: &mut Timings, stop: StopType, n: usize, gen_start: Instant| {
        timings.predicted_n = n;
        timings.predicted_ms = ms(gen_start.elapsed());
        timings.predicted_per_second = if timings.predicted_ms > 0.0 {
            n as f64 * 1000.0 / timings.predicted_ms
        } else {
            0.0
        };
        let _ = job.events.send(Event::Done {
            stop,
            timings: timings.clone(),
        });
        Outcome::Done(stop, n)
    };
    if job.max_new == 0 {
        return Ok(finish(&mut timings, StopType::Limit, 0, Instant::now()));
    }
    let t0 = Instant::now();
    let mut logits = engine.forward(&job.prompt)?;
    timings.prompt_ms = ms(t0.elapsed());
    m.prompt_tokens
        .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
    let gen_start = Instant::now();
    let mut n = 0usize;
    loop {
        let id = sampler.sample(&logits)?;
        if job.stop.get(id as usize).copied().unwrap_or(false) {
            return Ok(finish(&mut timings, StopType::Eos, n, gen_start));
        }
        let probs = (job.n_probs > 0).then(|| {
            let recent: Vec<u32> = recent.iter().copied().collect();
            top_logprobs(&logits, &recent, &job.params, id, job.n_probs)
        });
        accept(&mut sampler, &mut recent, id);
        n += 1;
        m.tokens_generated.fetch_add(1, Ordering::Relaxed);
        if job.events.send(Event::Token { id, probs }).is_err() {
            return Ok(Outcome::ClientGone(n));
        }
        if n >= job.max_new || engine.position() >= engine.context_length() {
            return Ok(finish(&mut timings, StopType::Limit, n, gen_start));
        }
        if job.events.is_closed() {
            return Ok(Outcome::ClientGone(n));
        }
        logits = engine.forward(&[id])?;
    }
}

/// Top-`n` `(id, logprob)` of the *sampling* distribution's logits: the raw logits after the
/// repetition penalty, divided by the temperature when it is positive (greedy: temperature 1), then
/// log-softmax. Non-finite results are clamped to `-f32::MAX` so the JSON stays numeric.
pub(crate) fn top_logprobs(
    logits: &[f32],
    recent: &[u32],
    params: &SamplingParams,
    chosen: u32,
    n: usize,
) -> PositionProbs {
    let mut work = logits.to_vec();
    if params.repeat_penalty != 1.0 && !recent.is_empty() {
        apply_repeat_penalty(&mut work, recent, params.repeat_penalty);
    }
    let t = if params.temperature > 0.0 {
        params.temperature as f64
    } else {
        1.0
    };
    let scaled: Vec<f64> = work.iter().map(|&l| l as f64 / t).collect();
    let max = scaled
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f64::NEG_INFINITY, f64::max);
    let logprob: Vec<f32> = if max == f64::INFINITY {
        // All mass on the +inf entries, shared equally.
        let k = scaled.iter().filter(|&&x| x == f64::INFINITY).count() as f64;
        scaled
            .iter()
            .map(|&x| {
                if x == f64::INFINITY {
                    -(k.ln())
                } else {
                    f64::NEG_INFINITY
                }
            })
            .map(clamp)
            .collect()
    } else {
        let sum: f64 = scaled
            .iter()
            .filter(|x| !x.is_nan())
            .map(|&x| (x - max).exp())
            .sum();
        let lse = max + sum.ln();
        scaled.iter().map(|&x| clamp(x - lse)).collect()
    };
    let mut order: Vec<u32> = (0..logprob.len() as u32).collect();
    let by = |a: &u32, b: &u32| {
        logprob[*b as usize]
            .total_cmp(&logprob[*a as usize])
            .then(a.cmp(b))
    };
    let n = n.min(order.len());
    if n > 0 && n < order.len() {
        order.select_nth_unstable_by(n - 1, by);
        order.truncate(n);
    }
    order.sort_unstable_by(by);
    PositionProbs {
        id: chosen,
        logprob: logprob.get(chosen as usize).copied().unwrap_or(-f32::MAX),
        top_logprobs: order
            .into_iter()
            .map(|id| TokenProb {
                id,
                logprob: logprob[id as usize],
            })
            .collect(),
    }
}

fn clamp(x: f64) -> f32 {
    if x.is_finite() {
        (x as f32).max(-f32::MAX)
    } else if x == f64::INFINITY {
        0.0
    } else {
        -f32::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, f32::NAN];
        let p = top_logprobs(&logits, &[], &SamplingParams::greedy(), 1, 2);
        assert_eq!(p.top_logprobs.len(), 2);
        assert_eq!(p.top_logprobs[0].id, 1);
        assert_eq!(p.top_logprobs[1].id, 2);
        let total: f32 = [0usize, 1, 2]
            .iter()
            .map(|&i| {
                top_logprobs(&logits, &[], &SamplingParams::greedy(), i as u32, 0)
                    .logprob
                    .exp()
            })
            .sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        // Penalty and infinities stay finite.
        let params = SamplingParams {
            repeat_penalty: 1e-38,
            ..SamplingParams::default()
        };
        let p = top_logprobs(&[5.0, 1.0, -1.0], &[0, 1], &params, 0, 3);
        assert!(p.top_logprobs.iter().all(|t| t.logprob.is_finite()));
    }
}
