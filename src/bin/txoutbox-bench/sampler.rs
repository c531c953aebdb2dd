//! Samples cumulative counters at a fixed interval on a thread of its own and turns them into
//! rates over time, for the throughput chart.

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

/// A running sampler; [`finish`](Self::finish) stops it and returns the lines.
pub struct Sampler {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<Vec<Line>>>,
}

impl Sampler {
    /// Calls `probe` now and every `interval`; `probe` returns the counters named by `names`,
    /// cumulative, in that order. A failed probe is logged and skipped.
    pub fn start<F>(names: &[&str], interval: Duration, mut probe: F) -> Result<Sampler>
    where
        F: FnMut() -> Result<Vec<u64>> + Send + 'static,
    {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-sampler".into())
            .spawn(move || {
                let mut lines: Vec<Line> = names
                    .into_iter()
                    .map(|name| Line {
                        name,
                        points: Vec::new(),
                    })
                    .collect();
                let start = Instant::now();
                let mut previous = probe().ok().map(|values| (0.0, values));
                for tick in 1u32.. {
                    let due = start + interval * tick;
                    if wait_until(&stopping, due) {
                        break;
                    }
                    let values = match probe() {
                        Ok(values) => values,
                        Err(e) => {
                            log::warn!("bench: cannot sample the counters: {e}");
                            continue;
                        }
                    };
                    let now = start.elapsed().as_secs_f64();
                    if let Some((then, before)) = &previous {
                        let seconds = now - then;
                        for (line, (after, before)) in lines.iter_mut().zip(values.iter().zip(before)) {
                            let rate = after.saturating_sub(*before) as f64 / seconds;
                            line.points.push((now, rate));
                        }
                    }
                    previous = Some((now, values));
                }
                lines
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
