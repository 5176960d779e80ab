//! Process-wide counters and their Prometheus text exposition.
//!
//! Labels are drawn from fixed sets (endpoint names, status codes, reasons), never from request
//! data, so a client cannot grow the label space.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The endpoint label of a request path.
pub(crate) fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/completion" => "completion",
        "/v1/completions" => "v1_completions",
        "/v1/models" => "v1_models",
        "/health" => "health",
        "/metrics" => "metrics",
        _ => "other",
    }
}

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Counters and gauges of one server.
#[derive(Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    /// Tokens produced by the worker (including those of jobs cancelled later).
    pub tokens_generated: AtomicU64,
    /// Prompt tokens evaluated by the worker.
    pub prompt_tokens: AtomicU64,
    /// Jobs waiting in the queue.
    pub queue_depth: AtomicI64,
    /// HTTP requests being handled (until their response head is ready).
    pub in_flight: AtomicI64,
    /// Jobs the worker is executing (0 or 1).
    pub jobs_running: AtomicI64,
    /// Requests rejected because the queue was full.
    pub rejected_queue_full: AtomicU64,
    /// Requests rejected because the server was shutting down.
    pub rejected_shutdown: AtomicU64,
    /// Jobs that ran to a stop id, EOS or their limit.
    pub jobs_completed: AtomicU64,
    /// Jobs stopped because their client went away (while queued or while running).
    pub jobs_cancelled: AtomicU64,
    /// Jobs that ended with an engine error or panic.
    pub jobs_failed: AtomicU64,
}

impl Metrics {
    /// Records one answered request.
    pub fn record_request(&self, endpoint: &'static str, status: u16, elapsed: Duration) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint, status)).or_default() += 1;
        }
        if let Ok(mut m) = self.latency.lock() {
            let h = m.entry(endpoint).or_default();
            let s = elapsed.as_secs_f64();
            for (i, &b) in BUCKETS.iter().enumerate() {
                if s <= b {
                    h.counts[i] += 1;
                }
            }
            h.count += 1;
            h.sum += s;
        }
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut o = String::new();
        let g = |a: &AtomicI64| a.load(Ordering::Relaxed);
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        o.push_str(
            "# HELP equicrypt_requests_total HTTP requests answered, by endpoint and status.\n",
        );
        o.push_str("# TYPE equicrypt_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((ep, st), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "equicrypt_requests_total{{endpoint=\"{ep}\",status=\"{st}\"}} {n}"
                );
            }
        }
        o.push_str("# HELP equicrypt_request_duration_seconds Time until the response head (streams: until the first event can be sent).\n");
        o.push_str("# TYPE equicrypt_request_duration_seconds histogram\n");
        if let Ok(m) = self.latency.lock() {
            for (ep, h) in m.iter() {
                for (i, b) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        o,
                        "equicrypt_request_duration_seconds_bucket{{endpoint=\"{ep}\",le=\"{b}\"}} {}",
                        h.counts[i]
                    );
                }
                let _ = writeln!(
                    o,
                    "equicrypt_request_duration_seconds_bucket{{endpoint=\"{ep}\",le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(
                    o,
                    "equicrypt_request_duration_seconds_sum{{endpoint=\"{ep}\"}} {}",
                    h.sum
                );
                let _ = writeln!(
                    o,
                    "equicrypt_request_duration_seconds_count{{endpoint=\"{ep}\"}} {}",
                    h.count
                );
            }
        }
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            "equicrypt_tokens_generated_total",
            "Tokens generated.",
            c(&self.tokens_generated),
        );
        counter(
            "equicrypt_prompt_tokens_total",
            "Prompt tokens evaluated.",
            c(&self.prompt_tokens),
        );
        counter(
            "equicrypt_jobs_completed_total",
            "Generation jobs that ran to a stop id, EOS or their limit.",
            c(&self.jobs_completed),
        );
        counter(
            "equicrypt_jobs_cancelled_total",
            "Generation jobs stopped because the client disconnected.",
            c(&self.jobs_cancelled),
        );
        counter(
            "equicrypt_jobs_failed_total",
            "Generation jobs that ended with an internal error.",
            c(&self.jobs_failed),
        );
        let _ = writeln!(
            o,
            "# HELP equicrypt_rejected_total Generation requests refused with 503, by reason.\n# TYPE equicrypt_rejected_total counter\nequicrypt_rejected_total{{reason=\"queue_full\"}} {}\nequicrypt_rejected_total{{reason=\"shutting_down\"}} {}",
            c(&self.rejected_queue_full),
            c(&self.rejected_shutdown)
        );
        let mut gauge = |name: &str, help: &str, v: i64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "equicrypt_queue_depth",
            "Generation jobs waiting in the queue.",
            g(&self.queue_depth),
        );
        gauge(
            "equicrypt_in_flight",
            "HTTP requests being handled.",
            g(&self.in_flight),
        );
        gauge(
            "equicrypt_jobs_running",
            "Generation jobs the worker is executing.",
            g(&self.jobs_running),
        );
        o
    }
}
