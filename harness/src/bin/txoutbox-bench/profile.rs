//! CPU profiles of the server and of the consumer under the load of (3): `perf record` (Debian's
//! linux-perf) attached to each process for a window of the same closed loop, after the measured
//! one (so that perf's own cost is not in the figures of (3)), rendered to a flame graph SVG with
//! inferno in the run's directory, and the functions with the most samples of their own.
//!
//! Stacks are unwound from DWARF call-frame information (`--call-graph dwarf`): Rust release
//! builds keep no frame pointers, so frame-pointer stacks would stop at the first frame. The
//! event is the `cycles` hardware counter where the machine has one, and the `cpu-clock`
//! software timer where it does not (virtual machines often have no counters). When perf is
//! missing or may not record here, the report says so and why, and the run goes on.

use crate::report::shorten;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use inferno::collapse::perf::{Folder, Options as CollapseOptions};
use inferno::collapse::Collapse;
use inferno::flamegraph::{self, Options as FlameOptions};

/// Entries shown per process, by samples of their own.
pub const TOP: usize = 15;

/// Samples per second per thread.
const FREQUENCY: &str = "499";

/// Stack bytes copied per sample for unwinding.
const STACK_BYTES: &str = "dwarf,16384";

/// How to get perf on Debian.
const INSTALL: &str = "apt-get install -y linux-perf";

/// A function and its share of a process's samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Function (or `[unknown]`, or a kernel symbol), as perf named it.
    pub function: String,
    /// Share of the process's samples in which it was the innermost frame, percent.
    pub self_percent: f64,
    /// Share of the process's samples in which it was on the stack at all, percent.
    pub total_percent: f64,
}

/// One process's profile.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// `server` or `consumer`.
    pub process: &'static str,
    /// Samples recorded.
    pub samples: u64,
    /// The flame graph, in the run's directory.
    pub svg: PathBuf,
    /// The [`TOP`] functions by self samples.
    pub top: Vec<Entry>,
}

/// The profiles of a run, or why there are none.
#[derive(Clone, Debug)]
pub enum Profiles {
    /// Recorded with `event` for `seconds`.
    Recorded {
        /// The perf event: `cycles` or `cpu-clock`.
        event: String,
        /// Length of the window.
        seconds: f64,
        /// Server, then consumer.
        profiles: Vec<Profile>,
    },
    /// Not recorded, and why (with what to do).
    Unavailable(String),
}

/// perf, checked to record on this machine, with the event it can use.
#[derive(Clone, Debug)]
pub struct Perf {
    program: String,
    event: &'static str,
}

impl Perf {
    /// Checks that perf is installed and may record, and picks the event; the error says what
    /// is missing and what to do.
    pub fn detect(scratch: &Path) -> Result<Perf, String> {
        Perf::detect_at("perf", scratch)
    }

    /// [`Perf::detect`] with the perf executable `program`.
    fn detect_at(program: &str, scratch: &Path) -> Result<Perf, String> {
        let version = Command::new(program).arg("--version").output();
        match version {
            Ok(output) if output.status.success() => {}
            Ok(_) | Err(_) => {
                return Err(format!(
                    "perf is not installed or does not run for this kernel ({INSTALL})"
                ))
            }
        }
        let event = if counts(program, "cycles") {
            "cycles"
        } else {
            "cpu-clock"
        };
        let probe = scratch.join("probe.perf.data");
        let output = Command::new(program)
            .args(["record", "-q", "-e", event, "-F", FREQUENCY, "-o"])
            .arg(&probe)
            .args(["--", "true"])
            .stdout(Stdio::null())
            .output();
        let _ = std::fs::remove_file(&probe);
        match output {
            Ok(output) if output.status.success() => Ok(Perf {
                program: program.to_string(),
                event,
            }),
            Ok(output) => Err(format!(
                "perf cannot record here ({}); run the bench as root or lower kernel.perf_event_paranoid \
                 (sysctl kernel.perf_event_paranoid=1)",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run perf: {e}")),
        }
    }

    /// Starts recording `pid` for `window` into `data`; [`Recording::finish`] waits for it.
    pub fn record(&self, pid: u32, window: Duration, data: &Path) -> Result<Recording, String> {
        let child = Command::new(&self.program)
            .args([
                "record",
                "-q",
                "-e",
                self.event,
                "-F",
                FREQUENCY,
                "--call-graph",
                STACK_BYTES,
            ])
            .args(["-p", &pid.to_string(), "-o"])
            .arg(data)
            .args(["--", "sleep", &format!("{:.3}", window.as_secs_f64())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start perf record: {e}"))?;
        Ok(Recording {
            program: self.program.clone(),
            child: Some(child),
            data: data.to_path_buf(),
        })
    }

    /// The event recorded with.
    pub fn event(&self) -> &'static str {
        self.event
    }
}

/// True when `perf stat -e event` counts something here (`<not supported>` on machines without
/// that counter).
fn counts(program: &str, event: &str) -> bool {
    Command::new(program)
        .args(["stat", "-x", ",", "-e", event, "--", "true"])
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stderr);
            o.status.success() && !text.contains("<not supported>") && !text.contains("<not counted>")
        })
        .unwrap_or(false)
}

/// A `perf record` running; killed if dropped before it finished.
pub struct Recording {
    program: String,
    child: Option<Child>,
    data: PathBuf,
}

impl Recording {
    /// Waits for the recording to end, then renders `process`'s flame graph into `dir` and
    /// ranks its functions; the perf data file is removed afterwards (the folded stacks stay).
    pub fn finish(mut self, process: &'static str, dir: &Path) -> Result<Profile, String> {
        let child = self.child.take().ok_or("perf was already stopped")?;
        let output = child
            .wait_with_output()
            .map_err(|e| format!("cannot wait for perf record: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "perf record of the {process} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let rendered = render(&self.program, process, &self.data, dir);
        let _ = std::fs::remove_file(&self.data);
        rendered
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `perf script` of `data`, folded by inferno into `<dir>/<process>.folded`, drawn into
/// `<dir>/<process>.svg`.
fn render(program: &str, process: &'static str, data: &Path, dir: &Path) -> Result<Profile, String> {
    let script = dir.join(format!("{process}.perf.txt"));
    let out = File::create(&script).map_err(|e| format!("cannot create {}: {e}", script.display()))?;
    // --no-inline: resolving inlined frames from the debug info takes minutes for a few
    // thousand samples; the flame graph shows the outer function instead.
    let status = Command::new(program)
        .args(["script", "--no-inline", "-i"])
        .arg(data)
        .stdout(out)
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run perf script: {e}"))?;
    if !status.success() {
        return Err(format!("perf script failed on {}", data.display()));
    }
    let samples = count_samples(&script)?;
    let folded_path = dir.join(format!("{process}.folded"));
    {
        let reader = BufReader::new(
            File::open(&script).map_err(|e| format!("cannot read {}: {e}", script.display()))?,
        );
        let writer = BufWriter::new(
            File::create(&folded_path)
                .map_err(|e| format!("cannot create {}: {e}", folded_path.display()))?,
        );
        Folder::from(CollapseOptions::default())
            .collapse(reader, writer)
            .map_err(|e| format!("cannot fold the stacks of the {process}: {e}"))?;
    }
    let _ = std::fs::remove_file(&script);
    let folded = std::fs::read_to_string(&folded_path)
        .map_err(|e| format!("cannot read {}: {e}", folded_path.display()))?;
    let (weight, top) = rank(&folded, TOP);
    let svg = dir.join(format!("{process}.svg"));
    let mut options = FlameOptions::default();
    options.title = format!("txoutbox-{process} under the load of (3)");
    options.count_name = "samples".into();
    let writer =
        BufWriter::new(File::create(&svg).map_err(|e| format!("cannot create {}: {e}", svg.display()))?);
    if weight > 0 {
        flamegraph::from_lines(&mut options, folded.lines(), writer)
            .map_err(|e| format!("cannot draw the flame graph of the {process}: {e}"))?;
    }
    Ok(Profile {
        process,
        samples,
        svg,
        top,
    })
}

/// Samples in `perf script` output: each starts with a header line at the margin, its frames
/// indented below it.
fn count_samples(script: &Path) -> Result<u64, String> {
    use std::io::BufRead;
    let file = File::open(script).map_err(|e| format!("cannot read {}: {e}", script.display()))?;
    let mut samples = 0;
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(|e| format!("cannot read {}: {e}", script.display()))?;
        if line.first().is_some_and(|b| !b.is_ascii_whitespace()) {
            samples += 1;
        }
    }
    Ok(samples)
}

/// Total weight (perf's sample periods: nanoseconds for `cpu-clock`) of folded stacks (`thread;outer;...;inner count` lines) and the `n` functions
/// with the most samples of their own (innermost frame), with their share on the stack at all.
pub fn rank(folded: &str, n: usize) -> (u64, Vec<Entry>) {
    let mut own: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut anywhere: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut total = 0u64;
    for line in folded.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        total += count;
        // The first frame is the thread's name.
        let frames: Vec<&str> = stack.split(';').skip(1).collect();
        if let Some(leaf) = frames.last() {
            *own.entry(leaf).or_default() += count;
        }
        let mut seen = std::collections::HashSet::new();
        for frame in frames {
            if seen.insert(frame) {
                *anywhere.entry(frame).or_default() += count;
            }
        }
    }
    let percent = |c: u64| {
        if total == 0 {
            0.0
        } else {
            c as f64 * 100.0 / total as f64
        }
    };
    let mut ranked: Vec<(&str, u64)> = own.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let top = ranked
        .into_iter()
        .take(n)
        .map(|(function, count)| Entry {
            function: function.to_string(),
            self_percent: percent(count),
            total_percent: percent(anywhere.get(function).copied().unwrap_or(count)),
        })
        .collect();
    (total, top)
}

impl Profiles {
    /// The console's lines (function names cut to `width`).
    pub fn console(&self, width: usize) -> Vec<String> {
        match self {
            Profiles::Unavailable(reason) => vec![format!("  not recorded: {reason}")],
            Profiles::Recorded {
                event,
                seconds,
                profiles,
            } => {
                let mut lines = vec![format!(
                    "  perf record -e {event} -F {FREQUENCY} --call-graph dwarf, {seconds:.0} s of the closed loop of (3)"
                )];
                for p in profiles {
                    lines.push(format!(
                        "  {}: {} samples, flame graph {}",
                        p.process,
                        p.samples,
                        p.svg.display()
                    ));
                    lines.push("      self %  total %  function".into());
                    for e in &p.top {
                        lines.push(format!(
                            "      {:>6.1}  {:>7.1}  {}",
                            e.self_percent,
                            e.total_percent,
                            shorten(&e.function, width)
                        ));
                    }
                }
                lines
            }
        }
    }

    /// summary.md's section.
    pub fn markdown(&self) -> String {
        match self {
            Profiles::Unavailable(reason) => format!("Not recorded: {reason}.\n"),
            Profiles::Recorded {
                event,
                seconds,
                profiles,
            } => {
                let mut out = format!(
                    "`perf record -e {event} -F {FREQUENCY} --call-graph dwarf` attached to each process for {seconds:.0} s \
                     of the closed loop of (3) (after its measured window); top {TOP} functions by samples of their own.\n"
                );
                for p in profiles {
                    let file = p
                        .svg
                        .file_name()
                        .map_or(String::new(), |f| f.to_string_lossy().into_owned());
                    out += &format!(
                        "\n**{}** ({} samples, [flame graph]({file}))\n\n| self % | total % | function |\n|---:|---:|---|\n",
                        p.process, p.samples
                    );
                    for e in &p.top {
                        out += &format!(
                            "| {:.1} | {:.1} | `{}` |\n",
                            e.self_percent,
                            e.total_percent,
                            shorten(&e.function, 140).replace('|', "\\|")
                        );
                    }
                }
                out
            }
        }
    }

    /// results.json's object.
    pub fn json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Profiles::Unavailable(reason) => json!({ "recorded": false, "reason": reason }),
            Profiles::Recorded {
                event,
                seconds,
                profiles,
            } => json!({
                "recorded": true,
                "event": event,
                "seconds": seconds,
                "processes": profiles.iter().map(|p| json!({
                    "process": p.process,
                    "samples": p.samples,
                    "svg": p.svg.file_name().map(|f| f.to_string_lossy().into_owned()),
                    "top": p.top.iter().map(|e| json!({
                        "function": e.function,
                        "self_percent": e.self_percent,
                        "total_percent": e.total_percent,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_perf_is_reported_with_how_to_install_it() {
        let reason = Perf::detect_at("/nonexistent/perf", &std::env::temp_dir()).expect_err("no perf there");
        assert!(reason.contains("apt-get install -y linux-perf"), "{reason}");
    }

    #[test]
    fn functions_are_ranked_by_their_own_samples() {
        let folded = "http-1;main;handle;write 30\nhttp-2;main;handle 10\nrelay;main;claim;write 20\nrelay;main;claim 40\n";
        let (total, top) = rank(folded, 2);
        assert_eq!(total, 100);
        assert_eq!(top[0].function, "write");
        assert_eq!(top[0].self_percent, 50.0);
        assert_eq!(top[1].function, "claim");
        assert_eq!(top[1].self_percent, 40.0);
        assert_eq!(top[1].total_percent, 60.0);
        assert_eq!(rank("", 5), (0, Vec::new()));
    }
}
