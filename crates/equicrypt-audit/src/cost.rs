//! What per-session vocabulary re-keying costs a server: the time to build each session's
//! embedding/head tables and the resident memory of holding them all (shared by the audit's
//! re-keying defence and `equicrypt rekey --bench`).

use std::path::Path;
use std::time::Instant;

use equicrypt_model::{BaseVocabTables, GgufFile};

use crate::AuditError;

/// Session tables built in memory and held together: what a server pays per session.
pub struct TableBench {
    /// Wall time of each session's tables, seconds.
    pub seconds: Vec<f64>,
    /// Bytes of one session's tables.
    pub bytes_per_session: u64,
    /// Bytes of the base model's vocabulary tensors.
    pub base_bytes: u64,
    /// Names of the re-keyed tensors.
    pub tensors: Vec<String>,
    /// Vocabulary size.
    pub vocab: usize,
    /// `VmRSS` in kB before building and while holding all the tables (Linux only).
    pub rss_kb: Option<(u64, u64)>,
}

impl TableBench {
    /// Median seconds per session.
    pub fn median_seconds(&self) -> f64 {
        let mut s = self.seconds.clone();
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied().unwrap_or(0.0)
    }
}

/// Builds the tables of every session in `labels` from the encrypted model and holds them all
/// while measuring resident memory.
pub fn bench_tables(
    encrypted: &Path,
    key: &equicrypt_core::SecretKey,
    labels: &[String],
) -> Result<TableBench, AuditError> {
    if labels.is_empty() {
        return Err(AuditError::InvalidInput(
            "the re-key benchmark needs at least one session".into(),
        ));
    }
    let mut f = GgufFile::open(encrypted)?;
    let base = BaseVocabTables::read(&mut f, key)?;
    drop(f);
    let rss_before = vm_rss_kb();
    let mut held = Vec::with_capacity(labels.len());
    let mut seconds = Vec::with_capacity(labels.len());
    for label in labels {
        let t = Instant::now();
        let tables = base.rekey(key, label).map_err(|source| AuditError::Rekey {
            label: label.clone(),
            source,
        })?;
        seconds.push(t.elapsed().as_secs_f64());
        held.push(tables);
    }
    let rss_after = vm_rss_kb();
    Ok(TableBench {
        seconds,
        bytes_per_session: held.first().map_or(0, |t| t.bytes()),
        base_bytes: base.bytes(),
        tensors: held
            .first()
            .map(|t| t.tensors.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default(),
        vocab: base.vocab(),
        rss_kb: rss_before.zip(rss_after),
    })
}

/// `VmRSS` of this process in kB (Linux).
fn vm_rss_kb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
