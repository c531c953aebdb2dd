//! A generation counter threads can wait on: "wake me when something happened since I looked,
//! or when asked to stop". Used to wake relay workers on NOTIFY without a busy loop.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Shared between the thread that signals and the threads that wait.
///
/// Wake-ups coalesce: while one woken worker has not yet started looking for work, further
/// signals wake nobody else, because that worker's look will see their work too. Under load
/// this turns a stream of one-event signals into fewer, larger batches.
#[derive(Debug, Default)]
pub struct Wakeup {
    state: Mutex<State>,
    /// Waiters for work ([`wait`](Self::wait)).
    work: Condvar,
    /// Sleepers that only care about a stop ([`sleep`](Self::sleep)).
    stopped: Condvar,
}

#[derive(Debug, Default)]
struct State {
    generation: u64,
    stopping: bool,
    /// A waiter was woken and has not called [`Wakeup::start_looking`] yet.
    wake_pending: bool,
}

impl Wakeup {
    /// The current generation; pass it to [`wait`](Self::wait) after looking for work.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Call right before looking for work: returns the generation to pass to
    /// [`wait`](Self::wait) afterwards, and lets the next signal wake another waiter.
    pub fn start_looking(&self) -> u64 {
        let mut state = self.lock();
        state.wake_pending = false;
        state.generation
    }

    /// Signals that there may be new work, waking one waiter unless one is already on its way.
    pub fn notify(&self) {
        let mut state = self.lock();
        state.generation += 1;
        if !state.wake_pending {
            state.wake_pending = true;
            self.work.notify_one();
        }
    }

    /// Asks every waiter to stop; [`is_stopping`](Self::is_stopping) stays true from now on.
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.work.notify_all();
        self.stopped.notify_all();
    }

    /// True once [`stop`](Self::stop) was called.
    pub fn is_stopping(&self) -> bool {
        self.lock().stopping
    }

    /// Waits until the generation differs from `seen`, a stop is asked, or `timeout` passes.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        let guard = self.lock();
        let _unused = self
            .work
            .wait_timeout_while(guard, timeout, |s| s.generation == seen && !s.stopping)
            .map(|(guard, _)| guard);
    }

    /// Sleeps for `duration` unless a stop is asked first. Returns true when stopping.
    pub fn sleep(&self, duration: Duration) -> bool {
        let guard = self.lock();
        let result = self.stopped.wait_timeout_while(guard, duration, |s| !s.stopping);
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

/// Logs a component's failures once per change of state (first failure, recovery), not once
/// per retry, so an outage leaves two lines in the log rather than thousands.
#[derive(Debug)]
pub struct FailureLog {
    name: String,
    failing: bool,
}

impl FailureLog {
    /// A log for the component `name` (the prefix of its lines, e.g. `relay[2]`).
    pub fn new(name: impl Into<String>) -> Self {
        FailureLog {
            name: name.into(),
            failing: false,
        }
    }

    /// Warns about `what` if this is the first failure since the last success.
    pub fn failed(&mut self, what: impl std::fmt::Display) {
        if !self.failing {
            log::warn!("{}: {what}; retrying with backoff", self.name);
            self.failing = true;
        }
    }

    /// Notes a success, logging the recovery if the component was failing.
    pub fn recovered(&mut self) {
        if self.failing {
            log::info!("{}: recovered", self.name);
            self.failing = false;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_signal_after_looking_ends_the_wait_and_one_before_does_not_get_lost() {
        let wakeup = Wakeup::default();
        let seen = wakeup.start_looking();
        wakeup.notify(); // arrives while "looking": the wait must return at once
        let started = Instant::now();
        wakeup.wait(seen, Duration::from_secs(30));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_sleeper_does_not_swallow_a_wake_up_meant_for_a_waiter() {
        let wakeup = Arc::new(Wakeup::default());
        let sleeper = {
            let wakeup = wakeup.clone();
            std::thread::spawn(move || wakeup.sleep(Duration::from_secs(30)))
        };
        let (looked, has_looked) = std::sync::mpsc::channel();
        let waiter = {
            let wakeup = wakeup.clone();
            std::thread::spawn(move || {
                let seen = wakeup.start_looking();
                let _ = looked.send(());
                wakeup.wait(seen, Duration::from_secs(30));
                wakeup.generation() != seen
            })
        };
        has_looked.recv().unwrap();
        wakeup.notify();
        assert!(
            waiter.join().unwrap(),
            "the waiter woke for the signal, not its timeout"
        );
        wakeup.stop();
        assert!(sleeper.join().unwrap());
    }
}
