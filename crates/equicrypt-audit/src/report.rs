//! The audit report: `report.json` (everything), `report.md` (tables and notes),
//! `recovery_by_rank.svg` (vocabulary recovered against public-frequency rank), and the
//! one-screen summary printed at the end.

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::score::Score;
use crate::AuditError;

type Result<T, E = AuditError> = std::result::Result<T, E>;

/// One attack run (or one defence measurement) in the report.
#[derive(Clone, Debug, Serialize)]
pub struct AttackRow {
    /// Short id, e.g. `A3` or `A3/rekey-1-session`.
    pub id: String,
    /// What the attack does.
    pub attack: String,
    /// What the attacker is assumed to know.
    pub knowledge: String,
    /// The defence in place (`none` when none).
    pub defence: String,
    /// Score on the held-out prompt set (absent without a key).
    pub score: Option<Score>,
    /// Fraction of the intercepted traffic's tokens the guess decrypts (absent without traffic
    /// truth).
    pub traffic_tokens_recovered: Option<f64>,
    /// Attacker wall time, seconds.
    pub attacker_seconds: f64,
    /// How the number came about.
    pub notes: String,
}

/// A measured fact that is not an attack score (costs, identification checks).
#[derive(Clone, Debug, Serialize)]
pub struct Fact {
    /// What was measured.
    pub what: String,
    /// The value, with unit.
    pub value: String,
}

/// The whole report: what [`crate::run::run_audit`] returns and writes.
#[derive(Debug, Serialize)]
pub struct AuditReport {
    /// The command line that produced it.
    pub command: String,
    /// Encrypted model path.
    pub encrypted: String,
    /// Its encryption mode.
    pub mode: String,
    /// Vocabulary size.
    pub vocab: usize,
    /// Budget preset.
    pub budget: String,
    /// What was given to the audit.
    pub given: Vec<String>,
    /// The attack rows.
    pub rows: Vec<AttackRow>,
    /// Other measurements.
    pub facts: Vec<Fact>,
    /// Attacks skipped and why.
    pub skipped: Vec<String>,
    /// Total wall time of the audit, seconds.
    pub total_seconds: f64,
}

fn pct(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{:.2} %", 100.0 * v))
}

impl AuditReport {
    /// Writes report.json, report.md and the plot into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| AuditError::Io {
            message: format!("cannot create {}", dir.display()),
            source,
        })?;
        write_atomic(
            &dir.join("report.json"),
            &serde_json::to_string_pretty(self)?,
        )?;
        let plotted = self.plot(&dir.join("recovery_by_rank.svg"))?;
        write_atomic(&dir.join("report.md"), &self.markdown(plotted))?;
        Ok(())
    }

    /// The table every view shares.
    fn table(&self) -> String {
        let mut s = String::from(
            "| id | attack | knowledge | defence | vocabulary recovered | held-out prompt tokens | held-out text tokens | traffic tokens | precision | attacker time |\n|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s |\n",
                r.id,
                r.attack,
                r.knowledge,
                r.defence,
                pct(r.score.as_ref().map(|s| s.vocab_recovered)),
                pct(r.score.as_ref().map(|s| s.tokens_recovered)),
                pct(r.score.as_ref().map(|s| s.text_tokens_recovered)),
                pct(r.traffic_tokens_recovered),
                pct(r.score.as_ref().map(|s| s.precision)),
                r.attacker_seconds
            ));
        }
        s
    }

    /// report.md.
    pub fn markdown(&self, plotted: bool) -> String {
        let mut md = format!(
            "# equicrypt audit\n\n`{}`\n\nModel: `{}` (mode `{}`, vocabulary {}). Budget: {}. Given: {}. Total time: {:.0} s.\n\n",
            self.command,
            self.encrypted,
            self.mode,
            self.vocab,
            self.budget,
            self.given.join(", "),
            self.total_seconds
        );
        md.push_str("Vocabulary recovered counts every id once; held-out prompt tokens weighs ids by how often real prompts use them (how much of a prompt the server reads: the 20 prompts of data/prompts.txt as chat turns, template included, plus data/eval.txt); held-out text tokens counts data/eval.txt alone (what a user wrote, no template); traffic tokens is the same over the intercepted traffic; precision is the share of the attack's guesses that are right.\n\n");
        md.push_str(&self.table());
        if plotted {
            md.push_str(
                "\n![vocabulary recovered by public-frequency rank](recovery_by_rank.svg)\n",
            );
        }
        md.push_str("\n## Notes\n\n");
        for r in &self.rows {
            md.push_str(&format!("- **{}** ({}): {}\n", r.id, r.attack, r.notes));
        }
        if !self.facts.is_empty() {
            md.push_str("\n## Measurements\n\n| what | value |\n|---|---|\n");
            for f in &self.facts {
                md.push_str(&format!("| {} | {} |\n", f.what, f.value));
            }
        }
        if !self.skipped.is_empty() {
            md.push_str("\n## Skipped\n\n");
            for s in &self.skipped {
                md.push_str(&format!("- {s}\n"));
            }
        }
        md.push_str("\n## Recovery by public-frequency rank\n\n| id |");
        let ranks: Vec<(usize, usize)> = self
            .rows
            .iter()
            .find_map(|r| r.score.as_ref())
            .map(|s| s.by_rank.iter().map(|b| (b.lo, b.hi)).collect())
            .unwrap_or_default();
        for (lo, hi) in &ranks {
            md.push_str(&format!(" ranks {}–{} |", lo + 1, hi));
        }
        md.push_str("\n|---|");
        md.push_str(&"---|".repeat(ranks.len()));
        md.push('\n');
        for r in &self.rows {
            if let Some(s) = &r.score {
                md.push_str(&format!("| {} |", r.id));
                for b in &s.by_rank {
                    md.push_str(&format!(" {:.1} % |", 100.0 * b.recovered));
                }
                md.push('\n');
            }
        }
        md
    }

    /// The one-screen summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "equicrypt audit of {} (mode {}, {:.0} s)\n{:<24} {:>8} {:>8} {:>8} {:>8} {:>9}\n",
            self.encrypted,
            self.mode,
            self.total_seconds,
            "attack",
            "vocab",
            "prompts",
            "text",
            "traffic",
            "time"
        );
        for r in &self.rows {
            s.push_str(&format!(
                "{:<24} {:>8} {:>8} {:>8} {:>8} {:>8.1}s\n",
                r.id,
                pct(r.score.as_ref().map(|s| s.vocab_recovered)),
                pct(r.score.as_ref().map(|s| s.tokens_recovered)),
                pct(r.score.as_ref().map(|s| s.text_tokens_recovered)),
                pct(r.traffic_tokens_recovered),
                r.attacker_seconds
            ));
        }
        for f in &self.facts {
            s.push_str(&format!("{}: {}\n", f.what, f.value));
        }
        for k in &self.skipped {
            s.push_str(&format!("skipped: {k}\n"));
        }
        s
    }

    /// Draws vocabulary recovered against frequency rank, one line per scored row; returns
    /// whether anything was drawn.
    fn plot(&self, path: &Path) -> Result<bool> {
        let series: Vec<(&str, Vec<(f64, f64)>)> = self
            .rows
            .iter()
            .filter_map(|r| {
                let s = r.score.as_ref()?;
                let pts = s
                    .by_rank
                    .iter()
                    .map(|b| {
                        (
                            ((b.lo + 1) as f64 * b.hi as f64).sqrt(),
                            100.0 * b.recovered,
                        )
                    })
                    .collect();
                Some((r.id.as_str(), pts))
            })
            .collect();
        if series.is_empty() {
            return Ok(false);
        }
        let max_x = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|x| x.0))
            .fold(10.0f64, f64::max);
        let tmp = path.with_extension("svg.tmp");
        {
            let root = SVGBackend::new(&tmp, (900, 540)).into_drawing_area();
            let e = |e: DrawingAreaErrorKind<_>| AuditError::Plot(format!("{e:?}"));
            root.fill(&WHITE).map_err(e)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    "Vocabulary recovered by public-frequency rank",
                    ("sans-serif", 20),
                )
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(50)
                .build_cartesian_2d((1.0f64..max_x * 1.5).log_scale(), 0.0f64..100.0)
                .map_err(e)?;
            chart
                .configure_mesh()
                .x_desc("rank of the token in public text (log)")
                .y_desc("% recovered")
                .draw()
                .map_err(e)?;
            for (i, (name, pts)) in series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                    .map_err(e)?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(e)?;
            root.present().map_err(e)?;
        }
        std::fs::rename(&tmp, path).map_err(|source| AuditError::Io {
            message: format!("cannot write {}", path.display()),
            source,
        })?;
        Ok(true)
    }
}

/// Writes `text` to a temporary file beside `path`, then renames it over `path`.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|source| AuditError::Io {
        message: format!("cannot write {}", tmp.display()),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| AuditError::Io {
        message: format!("cannot write {}", path.display()),
        source,
    })?;
    Ok(())
}
