//! A generation counter threads can wait on: "wake me when something happened since I looked,
//! or when asked to stop". Used to wake relay workers on NOTIFY without a busy loop.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Shared between the thread that signals and the threads that wait.
#[derive(Debug, Default)]
pub struct Wakeup {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    generation: u64,
    stopping: bool,
}

impl Wakeup {
    /// The current generation; pass it to [`wait`](Self::wait) after looking for work.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Signals that there may be new work, waking one waiter (who may recruit more).
    pub fn notify(&self) {
        self.lock().generation += 1;
        self.changed.notify_one();
    }

    /// Asks every waiter to stop; [`is_stopping`](Self::is_stopping) stays true from now on.
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.changed.notify_all();
    }

    /// True once [`stop`](Self::stop) was called.
    pub fn is_stopping(&self) -> bool {
        self.lock().stopping
    }

    /// Waits until the generation differs from `seen`, a stop is asked, or `timeout` passes.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        let guard = self.lock();
        let _unused = self
            .changed
            .wait_timeout_while(guard, timeout, |s| s.generation == seen && !s.stopping)
            .map(|(guard, _)| guard);
    }

    /// Sleeps for `duration` unless a stop is asked first. Returns true when stopping.
    pub fn sleep(&self, duration: Duration) -> bool {
        let guard = self.lock();
        let result = self.changed.wait_timeout_while(guard, duration, |s| !s.stopping);
        match result {
            Ok((guard, _)) => guard.stopping,
            Err(_) => true,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the counter inconsistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Capped exponential backoff with jitter, for reconnect loops.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `min` and doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The next delay (between half and all of the current step), then doubles the step.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = uuid::Uuid::new_v4().as_u128() as u64 % 1000;
        step / 2 + step.mul_f64(jitter as f64 / 2000.0)
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}
