//! Samples cumulative counters at a fixed interval and turns them into rates over time, for the
//! throughput chart: by a thread of its own, or by a loop that polls anyway.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use txoutbox::{Error, Result};

/// One counter's rate over time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Line {
    /// What is counted, e.g. `accepted` or `completed`.
    pub name: String,
    /// (seconds since the sampler started, events per second over the interval ending then).
    pub points: Vec<(f64, f64)>,
}

/// Turns successive readings of cumulative counters into rates, one point per interval.
pub struct Recorder {
    start: Instant,
    interval: Duration,
    next_due: Instant,
    previous: Option<(f64, Vec<u64>)>,
    lines: Vec<Line>,
}

impl Recorder {
    /// Starts now; a point is recorded at most once per `interval`.
    pub fn new(names: &[&str], interval: Duration) -> Recorder {
        let start = Instant::now();
        Recorder {
            start,
            interval,
            next_due: start,
            previous: None,
            lines: names
                .iter()
                .map(|name| Line {
                    name: name.to_string(),
                    points: Vec::new(),
                })
                .collect(),
        }
    }

    /// True when the next reading is due.
    pub fn due(&self) -> bool {
        Instant::now() >= self.next_due
    }

    /// The instant the next reading is due.
    pub fn next_due(&self) -> Instant {
        self.next_due
    }

    /// Takes a reading of the counters (in the order of the names) if one is due.
    pub fn observe(&mut self, values: Vec<u64>) {
        if !self.due() {
            return;
        }
        let now = self.start.elapsed().as_secs_f64();
        if let Some((then, before)) = &self.previous {
            let seconds = now - then;
            if seconds > 0.0 {
                for (line, (after, before)) in self.lines.iter_mut().zip(values.iter().zip(before)) {
                    line.points
                        .push((now, after.saturating_sub(*before) as f64 / seconds));
                }
            }
        }
        self.previous = Some((now, values));
        while self.next_due <= Instant::now() {
            self.next_due += self.interval;
        }
    }

    /// One line per counter.
    pub fn finish(self) -> Vec<Line> {
        self.lines
    }
}

/// A running sampler; [`finish`](Self::finish) stops it and returns the lines.
pub struct Sampler {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<Vec<Line>>>,
}

impl Sampler {
    /// Calls `probe` now and every `interval` on a thread of its own; `probe` returns the
    /// counters named by `names`, cumulative, in that order. A failed probe is logged and skipped.
    pub fn start<F>(names: &[&str], interval: Duration, mut probe: F) -> Result<Sampler>
    where
        F: FnMut() -> Result<Vec<u64>> + Send + 'static,
    {
        let mut recorder = Recorder::new(names, interval);
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-sampler".into())
            .spawn(move || {
                while !wait_until(&stopping, recorder.next_due()) {
                    match probe() {
                        Ok(values) => recorder.observe(values),
                        Err(e) => log::warn!("bench: cannot sample the counters: {e}"),
                    }
                }
                recorder.finish()
            })
            .map_err(|e| Error::Other(format!("cannot start the sampler thread: {e}")))?;
        Ok(Sampler {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops sampling and returns one line per counter.
    pub fn finish(mut self) -> Vec<Line> {
        self.signal_stop();
        self.thread
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default()
    }

    fn signal_stop(&self) {
        let (flag, changed) = &*self.stop;
        *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        changed.notify_all();
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.signal_stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sleeps until `due`; returns true at once when a stop is signalled.
fn wait_until(stop: &(Mutex<bool>, Condvar), due: Instant) -> bool {
    let (flag, changed) = stop;
    let mut stopped = flag.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if *stopped {
            return true;
        }
        let left = due.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stopped = match changed.wait_timeout(stopped, left) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        };
    }
}
