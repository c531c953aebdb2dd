//! Where a scenario's CPU went: the whole machine from `/proc/stat` (busy and I/O wait) and each
//! kind of process from `/proc/<pid>/stat` (Postgres, RabbitMQ, the txoutbox binaries, the bench
//! itself), between two snapshots. On a machine of two cores this says whether a rate was
//! bounded by the disk (commits) or by the processors everything shares.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};

/// Clock ticks per second of `/proc` CPU times (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// The groups reported, in order.
pub const GROUPS: [&str; 6] = ["postgres", "rabbitmq", "server", "consumer", "bench", "other"];

/// CPU counters at one instant.
#[derive(Clone, Debug)]
pub struct Snapshot {
    at: Instant,
    /// Busy and I/O-wait ticks of all CPUs together.
    busy: u64,
    iowait: u64,
    /// Ticks (user + system) per process id, with its group.
    processes: HashMap<u32, (usize, u64)>,
}

/// CPU used between two snapshots, in cores (1.0 = one core busy the whole time).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuUsage {
    /// Seconds between the snapshots.
    pub seconds: f64,
    /// All CPUs together, not idle and not waiting for I/O.
    pub busy: f64,
    /// Idle while some I/O (a WAL flush, for instance) was outstanding.
    pub iowait: f64,
    /// Per group of [`GROUPS`], in that order.
    pub groups: Vec<f64>,
}

impl CpuUsage {
    /// `busy 1.96, iowait 0.02; postgres 1.40, bench 0.50` (groups under 0.05 left out).
    pub fn brief(&self) -> String {
        let groups: Vec<String> = GROUPS
            .iter()
            .zip(&self.groups)
            .filter(|(_, cores)| **cores >= 0.05)
            .map(|(name, cores)| format!("{name} {cores:.2}"))
            .collect();
        format!(
            "busy {:.2}, iowait {:.2}; {}",
            self.busy,
            self.iowait,
            groups.join(", ")
        )
    }
}

impl Snapshot {
    /// Reads the counters now. Unreadable files count as zero (not on Linux: no breakdown).
    pub fn take() -> Snapshot {
        let (busy, iowait) = machine_ticks().unwrap_or((0, 0));
        let own = std::process::id();
        let mut processes = HashMap::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    continue;
                };
                if let Some((comm, ticks)) = parse_process_stat(&stat) {
                    let group = if pid == own { 4 } else { group_of(comm) };
                    processes.insert(pid, (group, ticks));
                }
            }
        }
        Snapshot {
            at: Instant::now(),
            busy,
            iowait,
            processes,
        }
    }

    /// CPU used from this snapshot to `later`.
    pub fn until(&self, later: &Snapshot) -> CpuUsage {
        let seconds = later.at.duration_since(self.at).as_secs_f64();
        if seconds <= 0.0 {
            return CpuUsage::default();
        }
        let cores = |ticks: u64| ticks as f64 / TICKS_PER_SECOND / seconds;
        let mut groups = vec![0u64; GROUPS.len()];
        for (pid, (group, ticks)) in &later.processes {
            let before = self.processes.get(pid).map_or(0, |(_, t)| *t);
            groups[*group] += ticks.saturating_sub(before);
        }
        CpuUsage {
            seconds,
            busy: cores(later.busy.saturating_sub(self.busy)),
            iowait: cores(later.iowait.saturating_sub(self.iowait)),
            groups: groups.into_iter().map(cores).collect(),
        }
    }
}

/// One step of a [`Timeline`]: the CPU used in the step that ended at `end`.
#[derive(Clone, Debug)]
pub struct Step {
    /// When the step ended.
    pub end: Instant,
    /// What it used.
    pub usage: CpuUsage,
}

/// CPU per step (a second, say) over a long run, taken on a thread of its own: who had the
/// processors in a moment of interest, such as a stall of a few seconds in a soak.
pub struct Timeline {
    stop: Sender<()>,
    /// Steps taken so far, kept or not.
    taken: Arc<AtomicUsize>,
    thread: Option<JoinHandle<Vec<Step>>>,
}

impl Timeline {
    /// Starts taking a snapshot every `step`, keeping at most `max_steps` of them (the last
    /// ones are dropped past it, so that memory stays bounded however long the run).
    pub fn start(step: Duration, max_steps: usize) -> std::io::Result<Timeline> {
        let (stop, stopped) = bounded::<()>(1);
        let taken = Arc::new(AtomicUsize::new(0));
        let counted = taken.clone();
        let thread = std::thread::Builder::new()
            .name("bench-cpu-timeline".into())
            .spawn(move || {
                let mut steps = Vec::new();
                let mut last = Snapshot::take();
                let mut next = last.at + step;
                loop {
                    match stopped.recv_timeout(next.saturating_duration_since(Instant::now())) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return steps,
                    }
                    let now = Snapshot::take();
                    if steps.len() < max_steps {
                        steps.push(Step {
                            end: now.at,
                            usage: last.until(&now),
                        });
                    }
                    counted.fetch_add(1, Ordering::Relaxed);
                    // After a step that overran (a busy machine), start afresh rather than
                    // taking the missed ones back to back.
                    next = (next + step).max(now.at + step / 2);
                    last = now;
                }
            })?;
        Ok(Timeline {
            stop,
            taken,
            thread: Some(thread),
        })
    }

    /// Steps taken so far, including those past the bound.
    pub fn taken(&self) -> usize {
        self.taken.load(Ordering::Relaxed)
    }

    /// Stops and returns the steps, in time order.
    pub fn finish(mut self) -> Vec<Step> {
        let _ = self.stop.try_send(());
        let steps = self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default();
        if self.taken() > steps.len() {
            log::warn!(
                "cpu timeline: kept the first {} of {} steps (its bound)",
                steps.len(),
                self.taken()
            );
        }
        steps
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        let _ = self.stop.try_send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The CPU used over the steps that overlap `from..to`, in cores (weighted by each step's
/// length); `None` when no step does.
pub fn usage_between(steps: &[Step], from: Instant, to: Instant) -> Option<CpuUsage> {
    let overlaps = |s: &Step| {
        let begin = s
            .end
            .checked_sub(Duration::from_secs_f64(s.usage.seconds))
            .unwrap_or(s.end);
        s.end > from && begin < to
    };
    let within: Vec<&Step> = steps.iter().filter(|s| overlaps(s)).collect();
    let seconds: f64 = within.iter().map(|s| s.usage.seconds).sum();
    if within.is_empty() || seconds <= 0.0 {
        return None;
    }
    let weighted = |f: &dyn Fn(&CpuUsage) -> f64| {
        within.iter().map(|s| f(&s.usage) * s.usage.seconds).sum::<f64>() / seconds
    };
    Some(CpuUsage {
        seconds,
        busy: weighted(&|u| u.busy),
        iowait: weighted(&|u| u.iowait),
        groups: (0..GROUPS.len())
            .map(|g| weighted(&|u| u.groups.get(g).copied().unwrap_or(0.0)))
            .collect(),
    })
}

/// Index in [`GROUPS`] of a process by its command name (at most 15 characters in /proc).
fn group_of(comm: &str) -> usize {
    match comm {
        "postgres" => 0,
        "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost" => 1,
        "txoutbox-server" => 2,
        c if c.starts_with("txoutbox-consum") => 3,
        "txoutbox-bench" => 4,
        _ => 5,
    }
}

/// (busy, iowait) ticks from the `cpu` line of /proc/stat.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_line(stat.lines().next()?)
}

/// `cpu  user nice system idle iowait irq softirq steal ...`: busy is all but idle and iowait.
fn parse_machine_line(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields.take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    if values.len() < 5 {
        return None;
    }
    let (idle, iowait) = (values[3], values[4]);
    Some((values.iter().sum::<u64>() - idle - iowait, iowait))
}

/// (command name, user + system ticks) from a /proc/<pid>/stat line.
fn parse_process_stat(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    // After the name: state is field 3; utime and stime are fields 14 and 15.
    let mut rest = stat.get(close + 1..)?.split_whitespace().skip(11);
    let user: u64 = rest.next()?.parse().ok()?;
    let system: u64 = rest.next()?.parse().ok()?;
    Some((comm, user + system))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_lines_parse() {
        let line = "cpu  100 5 50 1000 20 3 7 0 0 0";
        assert_eq!(parse_machine_line(line), Some((165, 20)));
        let stat = "4242 (txoutbox-serv er) S 1 2 3 4 5 6 7 8 9 10 150 30 0 0 20 0 16 0";
        assert_eq!(parse_process_stat(stat), Some(("txoutbox-serv er", 180)));
        assert_eq!(group_of("txoutbox-consum"), 3);
        assert_eq!(group_of("beam.smp"), 1);
        assert_eq!(group_of("bash"), 5);
    }

    #[test]
    fn a_window_of_the_timeline_averages_the_steps_that_overlap_it() {
        let start = Instant::now();
        let step = |second: u64, busy: f64, postgres: f64| Step {
            end: start + Duration::from_secs(second),
            usage: CpuUsage {
                seconds: 1.0,
                busy,
                iowait: 0.0,
                groups: vec![postgres, 0.0, 0.0, 0.0, 0.0, 0.0],
            },
        };
        let steps = [
            step(1, 1.0, 0.5),
            step(2, 2.0, 1.5),
            step(3, 2.0, 1.0),
            step(4, 1.0, 0.2),
        ];
        // From 1.5 s to 2.5 s: the steps of 1..2 s and 2..3 s overlap it.
        let window = usage_between(
            &steps,
            start + Duration::from_millis(1_500),
            start + Duration::from_millis(2_500),
        )
        .expect("two steps overlap the window");
        assert_eq!(window.seconds, 2.0);
        assert_eq!(window.busy, 2.0);
        assert_eq!(window.groups[0], 1.25);
        // A step that ended at the window's start does not overlap it.
        let after = usage_between(
            &steps,
            start + Duration::from_secs(4),
            start + Duration::from_secs(9),
        );
        assert!(after.is_none());
    }

    #[test]
    fn the_timeline_takes_a_step_per_interval_and_keeps_at_most_its_bound() {
        let timeline = Timeline::start(Duration::from_millis(20), 3).expect("thread starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while timeline.taken() < 6 {
            assert!(
                Instant::now() < deadline,
                "six steps of 20 ms not taken within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let steps = timeline.finish();
        assert_eq!(steps.len(), 3, "bounded at 3 although 6 were taken");
        assert!(steps.windows(2).all(|w| w[0].end < w[1].end));
        assert!(steps.iter().all(|s| s.usage.seconds > 0.0));
    }

    #[test]
    fn usage_is_in_cores() {
        let start = Instant::now();
        let before = Snapshot {
            at: start,
            busy: 0,
            iowait: 0,
            processes: HashMap::from([(1, (0, 100))]),
        };
        let after = Snapshot {
            at: start + std::time::Duration::from_secs(2),
            busy: 300,
            iowait: 20,
            processes: HashMap::from([(1, (0, 300)), (2, (2, 50))]),
        };
        let usage = before.until(&after);
        assert_eq!(usage.busy, 1.5);
        assert_eq!(usage.iowait, 0.1);
        assert_eq!(usage.groups, vec![1.0, 0.0, 0.25, 0.0, 0.0, 0.0]);
        assert_eq!(
            usage.brief(),
            "busy 1.50, iowait 0.10; postgres 1.00, server 0.25"
        );
    }
}
