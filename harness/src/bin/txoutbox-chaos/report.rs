//! What a case found, and the table of all cases (stdout and `results.md`).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::options::{Case, Plan};
use crate::verify::Counts;
use txoutbox_harness::support::timestamp::Timestamp;

/// One property a case checks besides the counts.
#[derive(Clone, Debug)]
pub struct Check {
    /// What should hold.
    pub what: String,
    /// Whether it did.
    pub passed: bool,
    /// What was seen.
    pub detail: String,
}

/// The outcome of one case.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// Which case.
    pub case: Case,
    /// Its row title.
    pub title: String,
    /// The counts, when the case got that far.
    pub counts: Option<Counts>,
    /// Every order completed and the outbox emptied before the deadline.
    pub drained: bool,
    /// How long the drain took after the load ended.
    pub drain_took: Duration,
    /// A request that got no answer in time (or a non-2xx slower than the limit).
    pub hung: bool,
    /// The case's own checks.
    pub checks: Vec<Check>,
    /// What is worth knowing but decides nothing, one line each; the first goes to the table.
    pub notes: Vec<String>,
    /// Why the case could not be carried out, if it could not.
    pub error: Option<String>,
    /// The logs of its processes.
    pub logs: Vec<PathBuf>,
    /// How long the case took.
    pub elapsed: Duration,
}

impl CaseResult {
    /// An empty result for `case`.
    pub fn new(case: Case, plan: &Plan) -> CaseResult {
        CaseResult {
            case,
            title: case.title(plan),
            counts: None,
            drained: false,
            drain_took: Duration::ZERO,
            hung: false,
            checks: Vec::new(),
            notes: Vec::new(),
            error: None,
            logs: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    /// Records a check.
    pub fn check(&mut self, what: impl Into<String>, passed: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            what: what.into(),
            passed,
            detail: detail.into(),
        });
    }

    /// True when nothing was lost or doubled, nothing hung, and every check passed.
    pub fn passed(&self) -> bool {
        self.verdict() == "OK"
    }

    /// `OK`, or the most serious failure: `ERROR`, `LOST`, `DOUBLED`, `HUNG`, `FAIL`.
    pub fn verdict(&self) -> &'static str {
        let Some(counts) = &self.counts else {
            return "ERROR";
        };
        if counts.lost() > 0 {
            "LOST"
        } else if counts.duplicates() > 0 {
            "DOUBLED"
        } else if self.hung || !self.drained {
            "HUNG"
        } else if self.error.is_some() || self.checks.iter().any(|c| !c.passed) {
            "FAIL"
        } else {
            "OK"
        }
    }

    /// One line for the console.
    pub fn summary_line(&self) -> String {
        let mut line = match &self.counts {
            Some(c) => format!(
                "  -> {}: accepted {}, COMPLETED {}, duplicates {}, lost {}",
                self.verdict(),
                c.accepted,
                completed(c),
                c.duplicates(),
                c.lost()
            ),
            None => format!("  -> {}", self.verdict()),
        };
        if let Some(e) = &self.error {
            let _ = write!(line, "\n     error: {e}");
        }
        for check in self.checks.iter().filter(|c| !c.passed) {
            let _ = write!(line, "\n     failed: {}: {}", check.what, check.detail);
        }
        line
    }
}

/// The COMPLETED figure: `N`, or `N + M CANCELLED` when the case cancelled orders.
fn completed(c: &Counts) -> String {
    if c.cancelled == 0 {
        c.completed.to_string()
    } else {
        format!("{} + {} CANCELLED", c.completed, c.cancelled)
    }
}

/// The results table (markdown, also readable as plain text).
pub fn table(results: &[CaseResult]) -> String {
    let mut out = String::new();
    out.push_str("| Failure | Orders accepted | COMPLETED | Duplicates | Lost | Result | Seen |\n");
    out.push_str("|---|---:|---:|---:|---:|---|---|\n");
    for r in results {
        let (accepted, completed, duplicates, lost) = match &r.counts {
            Some(c) => (
                c.accepted.to_string(),
                completed(c),
                c.duplicates().to_string(),
                c.lost().to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let seen = match &r.error {
            Some(e) => e.replace('|', "/"),
            None => r.notes.first().cloned().unwrap_or_default().replace('|', "/"),
        };
        let _ = writeln!(
            out,
            "| {} | {accepted} | {completed} | {duplicates} | {lost} | {} | {seen} |",
            r.title,
            r.verdict()
        );
    }
    out
}

/// The whole `results.md`: the table, then each case's checks, notes and logs.
pub fn render(results: &[CaseResult], plan: &Plan, timestamp: &Timestamp, elapsed: Duration) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# txoutbox-chaos {}\n", timestamp.iso);
    let _ = writeln!(
        out,
        "{} run: load {} orders/s (open loop) on {} connections, {} s before the failure and {} s \
         after it; outages {} s; a killed process stays dead {} s; drain deadline {} s. \
         Took {:.0} s.\n",
        if plan.quick { "Quick" } else { "Full" },
        plan.rate,
        plan.connections,
        plan.warmup.as_secs(),
        plan.after.as_secs(),
        plan.outage.as_secs(),
        plan.dead_for.as_secs(),
        plan.drain_deadline.as_secs(),
        elapsed.as_secs_f64()
    );
    out.push_str(&table(results));
    out.push_str(
        "\nAccepted: POSTs answered 201. COMPLETED: of those, COMPLETED at the end (+ the orders \
         the case cancelled that are CANCELLED). Duplicates: second effects (an order with two \
         processed events of one type or two changes to one status). Lost: accepted orders not \
         in their final state.\n",
    );
    for r in results {
        let _ = writeln!(out, "\n## {} ({}): {}\n", r.title, r.case.slug(), r.verdict());
        if let Some(e) = &r.error {
            let _ = writeln!(out, "- error: {e}");
        }
        if let Some(c) = &r.counts {
            let _ = writeln!(
                out,
                "- counts: accepted {}, COMPLETED {}, processed {}, missing {}, duplicates {}, lost {}; \
                 orders in the database {} (PENDING {}), outbox left {} (failed {}); \
                 redeliveries absorbed by the dedupe {}{}",
                c.accepted,
                completed(c),
                c.processed,
                c.missing,
                c.duplicates(),
                c.lost(),
                c.orders_total,
                c.pending_total,
                c.outbox_left,
                c.outbox_failed,
                c.redelivered,
                if c.cancelled == 0 {
                    String::new()
                } else {
                    format!(
                        "; OrderCancelled processed {}, cancellations undone {}",
                        c.cancels_processed, c.undone_cancels
                    )
                }
            );
            let _ = writeln!(
                out,
                "- drain: {} {:.1} s after the load ended",
                if r.drained { "done" } else { "NOT done" },
                r.drain_took.as_secs_f64()
            );
        }
        for check in &r.checks {
            let mark = if check.passed { "ok" } else { "FAILED" };
            let _ = writeln!(out, "- {mark}: {} ({})", check.what, check.detail);
        }
        for note in &r.notes {
            let _ = writeln!(out, "- {note}");
        }
        let logs: Vec<String> = r.logs.iter().map(|p| format!("`{}`", p.display())).collect();
        if !logs.is_empty() {
            let _ = writeln!(out, "- logs: {}", logs.join(", "));
        }
        let _ = writeln!(out, "- took {:.0} s", r.elapsed.as_secs_f64());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Options;

    #[test]
    fn the_verdict_names_the_worst_failure() {
        let plan = Plan::new(&Options::parse(Vec::new()).expect("defaults"));
        let mut r = CaseResult::new(Case::KillServer, &plan);
        assert_eq!(r.verdict(), "ERROR");
        r.counts = Some(Counts {
            accepted: 5,
            completed: 5,
            ..Counts::default()
        });
        r.drained = true;
        assert_eq!(r.verdict(), "OK");
        r.check("POSTs answered", false, "503 x1");
        assert_eq!(r.verdict(), "FAIL");
        r.hung = true;
        assert_eq!(r.verdict(), "HUNG");
        r.counts = Some(Counts {
            accepted: 5,
            completed: 4,
            extra_effects: 1,
            ..Counts::default()
        });
        assert_eq!(r.verdict(), "LOST");
        let text = table(&[r]);
        assert!(
            text.contains("| kill -9 server mid-load, restart | 5 | 4 | 1 | 1 | LOST |"),
            "{text}"
        );
    }
}
