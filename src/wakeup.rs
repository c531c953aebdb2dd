//! A generation counter threads can wait on: "wake me when something happened since I looked,
//! or when asked to stop". Used to wake relay workers on NOTIFY without a busy loop.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Shared between the thread that signals and the threads that wait.
///
/// Wake-ups coalesce: while one woken worker has not yet started looking for work, further
/// signals wake nobody else, because that worker's look will see their work too. Under load
/// this turns a stream of one-event signals into fewer, larger batches.
///
/// A signal sends one thread looking, not two: when it is handed to an idle waiter, a busy
/// thread that finishes its round afterwards goes to sleep instead of looking again; only a
/// signal that found no idle waiter is left for the next thread to finish. (A relay worker that
/// looked again for every signal of its round found nothing half the time at low load: an
/// empty transaction per event.)
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
    /// A waiter was sent looking and has not called [`Wakeup::start_looking`] yet.
    wake_pending: bool,
    /// The signal handed to the waiters, not yet taken by one of them.
    ticket: bool,
    /// Threads in [`Wakeup::wait`].
    idle: usize,
    /// A signal came while no thread was waiting: the next to wait must look instead.
    unserved: bool,
}

impl Wakeup {
    /// The current generation (signals so far).
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Call right before looking for work: the look covers every signal so far. Returns the
    /// generation to pass to [`wait`](Self::wait) afterwards, and lets the next signal wake
    /// another waiter.
    pub fn start_looking(&self) -> u64 {
        let mut state = self.lock();
        state.wake_pending = false;
        state.unserved = false;
        state.generation
    }

    /// Signals that there may be new work: sends one waiter looking unless one is already on
    /// its way, or, with every thread busy, the next one to finish.
    pub fn notify(&self) {
        let mut state = self.lock();
        state.generation += 1;
        if state.wake_pending {
            return;
        }
        if state.idle > 0 {
            state.wake_pending = true;
            state.ticket = true;
            self.work.notify_one();
        } else {
            state.unserved = true;
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

    /// Waits until a signal sends this thread looking, a stop is asked, or `timeout` passes;
    /// returns at once when a signal since `seen` ([`start_looking`](Self::start_looking))
    /// found no waiter to take it. Returns true when a signal sent this thread looking (until
    /// it calls `start_looking`, further signals wake nobody else).
    pub fn wait(&self, seen: u64, timeout: Duration) -> bool {
        let mut state = self.lock();
        if state.unserved && state.generation != seen {
            // This thread takes the signal: the next to finish need not look for it too.
            state.unserved = false;
            state.wake_pending = true;
            return true;
        }
        state.idle += 1;
        let mut state = match self
            .work
            .wait_timeout_while(state, timeout, |s| !s.ticket && !s.stopping)
        {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        };
        state.idle -= 1;
        std::mem::take(&mut state.ticket)
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
    fn a_signal_handed_to_an_idle_waiter_sends_one_thread_looking_not_two() {
        let wakeup = Arc::new(Wakeup::default());
        let (looked, has_looked) = std::sync::mpsc::channel();
        let idle = {
            let wakeup = wakeup.clone();
            std::thread::spawn(move || {
                let seen = wakeup.start_looking();
                let _ = looked.send(());
                let started = Instant::now();
                wakeup.wait(seen, Duration::from_secs(2));
                started.elapsed()
            })
        };
        has_looked.recv().unwrap();
        // The other thread is busy with a round while the signal comes.
        let busy_seen = wakeup.start_looking();
        while wakeup.lock().idle == 0 {
            std::thread::yield_now();
        }
        wakeup.notify();
        let started = Instant::now();
        wakeup.wait(busy_seen, Duration::from_secs(2));
        let busy_waited = started.elapsed();
        let idle_waited = idle.join().unwrap();
        let woken = [busy_waited, idle_waited]
            .iter()
            .filter(|waited| **waited < Duration::from_secs(1))
            .count();
        assert_eq!(
            woken, 1,
            "one signal woke {woken} threads (waited {busy_waited:?} and {idle_waited:?})"
        );
    }

    #[test]
    fn a_signal_while_every_thread_is_busy_sends_the_next_to_finish_looking() {
        let wakeup = Wakeup::default();
        let first = wakeup.start_looking();
        let second = wakeup.start_looking();
        wakeup.notify();
        let started = Instant::now();
        wakeup.wait(first, Duration::from_secs(30));
        assert!(started.elapsed() < Duration::from_secs(10), "the signal was lost");
        // The first looks again and covers it: the second need not.
        wakeup.start_looking();
        let started = Instant::now();
        wakeup.wait(second, Duration::from_millis(300));
        assert!(started.elapsed() >= Duration::from_millis(300));
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
