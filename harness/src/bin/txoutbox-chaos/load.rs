//! Open-loop load: `POST /orders` at a steady rate from a few threads, each on its own
//! keep-alive connection (the same client as `txoutbox-stress`), whatever the server answers.
//! Every answer is recorded with when it was sent and how long it took, so a case can look at
//! the window of its failure; the ids of the 201s are the orders that must not be lost.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use txoutbox::{Error, Result};
use txoutbox_harness::stress::{order_id, OrderClient};
use uuid::Uuid;

/// How one POST ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// 201 with an order id: an accepted order.
    Created(Uuid),
    /// Any other answer: the status, and whether the body was a JSON object with an `error`.
    Status { status: u16, json_error: bool },
    /// No answer: connection refused or reset, or no progress within the client's 10 s.
    NoAnswer(String),
}

/// One POST.
#[derive(Clone, Debug)]
pub struct Record {
    /// When it was sent, from the start of the load.
    pub sent: Duration,
    /// How long until the whole answer (or the failure) arrived.
    pub latency: Duration,
    /// What came back.
    pub outcome: Outcome,
}

/// A running load; [`stop`](Self::stop) ends it and hands over the records.
pub struct Load {
    start: Instant,
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Record>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `connections` threads that together offer `rate` orders per second to `url`.
    pub fn start(url: &str, rate: u32, connections: usize) -> Result<Load> {
        let start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let interval = Duration::from_secs_f64(connections as f64 / f64::from(rate.max(1)));
        let mut threads = Vec::with_capacity(connections);
        for index in 0..connections {
            let mut client = OrderClient::new(url)?;
            let (stop, records) = (stop.clone(), records.clone());
            // Spread the threads' first sends over one interval.
            let offset = interval.mul_f64(index as f64 / connections as f64);
            let thread = std::thread::Builder::new()
                .name(format!("load-{index}"))
                .spawn(move || {
                    let mut next = start + offset;
                    while !stop.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                            continue;
                        }
                        let sent = Instant::now();
                        let outcome = match client.post_order_raw() {
                            Ok((201, body)) => match order_id(&body) {
                                Some(id) => Outcome::Created(id),
                                None => Outcome::Status {
                                    status: 201,
                                    json_error: false,
                                },
                            },
                            Ok((status, body)) => Outcome::Status {
                                status,
                                json_error: is_json_error(&body),
                            },
                            Err(e) => Outcome::NoAnswer(e),
                        };
                        let record = Record {
                            sent: sent - start,
                            latency: sent.elapsed(),
                            outcome,
                        };
                        records.lock().unwrap_or_else(|p| p.into_inner()).push(record);
                        // Open loop without catching up: a late send moves the schedule.
                        next = (next + interval).max(Instant::now());
                    }
                })
                .map_err(|e| Error::Other(format!("cannot start a load thread: {e}")))?;
            threads.push(thread);
        }
        Ok(Load {
            start,
            stop,
            records,
            threads,
        })
    }

    /// Time since the load started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Accepted orders so far.
    pub fn accepted_so_far(&self) -> usize {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Created(_)))
            .count()
    }

    /// Stops sending (each thread finishes the request in hand) and returns every record.
    pub fn stop(mut self) -> Vec<Record> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        let mut records = std::mem::take(&mut *self.records.lock().unwrap_or_else(|p| p.into_inner()));
        records.sort_by_key(|r| r.sent);
        records
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// How many times a cancel is sent again after a 5xx or no answer, and the pause between.
const CANCEL_TRIES: u32 = 20;
const CANCEL_PAUSE: Duration = Duration::from_millis(250);
/// How long after its creation an order is cancelled: its two events are then some tens of
/// deliveries apart, often in different batches of the consumer, within one prefetch window.
const CANCEL_AFTER: Duration = Duration::from_millis(300);

/// Orders created and cancelled [`CANCEL_AFTER`] later, from one thread beside the [`Load`]:
/// each leaves an `OrderCreated` and then an `OrderCancelled` of its aggregate on the way to
/// the consumer. [`stop`](Self::stop) cancels the orders still waiting, ends it and says which
/// orders are cancelled for certain.
pub struct Cancels {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<CancelTally>>,
}

/// What the cancelling thread did.
#[derive(Clone, Debug, Default)]
pub struct CancelTally {
    /// Orders created (201) and cancelled for certain: answered 200, or 409 on a retry after
    /// an answer lost (the first attempt had cancelled it).
    pub cancelled: Vec<Uuid>,
    /// Orders created whose cancel got no 200 or 409 in [`CANCEL_TRIES`]: their state is
    /// unknown, so they are left out of the counts.
    pub unresolved: Vec<Uuid>,
    /// Cancels sent again after a 5xx or no answer.
    pub retries: usize,
    /// Creations that got no 201 (nothing to cancel).
    pub not_created: usize,
}

impl Cancels {
    /// Starts creating and cancelling `rate` orders per second at `url`.
    pub fn start(url: &str, rate: u32) -> Result<Cancels> {
        let mut client = OrderClient::new(url)?;
        let stop = Arc::new(AtomicBool::new(false));
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cancels".into())
            .spawn(move || create_and_cancel(&mut client, interval, &stopping))
            .map_err(|e| Error::Other(format!("cannot start the cancelling thread: {e}")))?;
        Ok(Cancels {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops (the order in hand is finished) and returns the tally.
    pub fn stop(mut self) -> CancelTally {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Cancels {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The cancelling thread: an order every `interval` until `stop`, each cancelled once it is
/// [`CANCEL_AFTER`] old; the ones still waiting at the end are cancelled then.
fn create_and_cancel(client: &mut OrderClient, interval: Duration, stop: &AtomicBool) -> CancelTally {
    let mut tally = CancelTally::default();
    let mut waiting: VecDeque<(Uuid, Instant)> = VecDeque::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next = (next + interval).max(Instant::now());
        match client.post_order_raw() {
            Ok((201, body)) => match order_id(&body) {
                Some(id) => waiting.push_back((id, Instant::now())),
                None => tally.not_created += 1,
            },
            _ => tally.not_created += 1,
        }
        while let Some(&(id, created)) = waiting.front() {
            if created.elapsed() < CANCEL_AFTER {
                break;
            }
            waiting.pop_front();
            cancel_for_certain(client, id, &mut tally);
        }
    }
    for (id, _) in waiting {
        cancel_for_certain(client, id, &mut tally);
    }
    tally
}

/// Cancels order `id`, again after a 5xx or no answer (a cancel is idempotent: a retry of one
/// that went through gets 409), until it is cancelled for certain or [`CANCEL_TRIES`] pass.
fn cancel_for_certain(client: &mut OrderClient, id: Uuid, tally: &mut CancelTally) {
    for attempt in 0..CANCEL_TRIES {
        if attempt > 0 {
            tally.retries += 1;
            std::thread::sleep(CANCEL_PAUSE);
        }
        match client.cancel_order_raw(id) {
            Ok((200 | 409, _)) => {
                tally.cancelled.push(id);
                return;
            }
            Ok((status, _)) if status < 500 => break,
            _ => {}
        }
    }
    tally.unresolved.push(id);
}

fn is_json_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|v| v.get("error").is_some_and(serde_json::Value::is_string))
}

/// The ids of every accepted order.
pub fn accepted_ids(records: &[Record]) -> Vec<Uuid> {
    records
        .iter()
        .filter_map(|r| match r.outcome {
            Outcome::Created(id) => Some(id),
            _ => None,
        })
        .collect()
}

/// What a set of records says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// POSTs sent.
    pub sent: usize,
    /// 201s with an id.
    pub created: usize,
    /// Other answers by status.
    pub statuses: BTreeMap<u16, usize>,
    /// Other answers whose body was not a JSON `{"error": ...}`.
    pub not_json: usize,
    /// POSTs without an answer.
    pub no_answer: usize,
    /// Of those, the ones that timed out (the server hung).
    pub timed_out: usize,
    /// Slowest answer that was not a 201 (none when all were).
    pub slowest_failure: Option<Duration>,
    /// Slowest answer of all.
    pub slowest: Option<Duration>,
    /// The first few distinct reasons for no answer.
    pub no_answer_samples: Vec<String>,
}

impl Summary {
    /// Summarises the records sent within `window` (all of them with `None`).
    pub fn of(records: &[Record], window: Option<(Duration, Duration)>) -> Summary {
        let mut summary = Summary::default();
        let inside = |r: &&Record| window.map_or(true, |(from, to)| r.sent >= from && r.sent <= to);
        for record in records.iter().filter(inside) {
            summary.sent += 1;
            summary.slowest = summary.slowest.max(Some(record.latency));
            match &record.outcome {
                Outcome::Created(_) => summary.created += 1,
                Outcome::Status { status, json_error } => {
                    *summary.statuses.entry(*status).or_default() += 1;
                    if !json_error {
                        summary.not_json += 1;
                    }
                    summary.slowest_failure = summary.slowest_failure.max(Some(record.latency));
                }
                Outcome::NoAnswer(reason) => {
                    summary.no_answer += 1;
                    if reason.contains("no progress") {
                        summary.timed_out += 1;
                    }
                    summary.slowest_failure = summary.slowest_failure.max(Some(record.latency));
                    // Ports and addresses vary; keep the first few kinds.
                    if summary.no_answer_samples.len() < 3 && !summary.no_answer_samples.contains(reason) {
                        summary.no_answer_samples.push(reason.clone());
                    }
                }
            }
        }
        summary
    }

    /// "503 x41, no answer x12": what was not a 201.
    pub fn failures(&self) -> String {
        let mut parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(status, n)| format!("{status} x{n}"))
            .collect();
        if self.no_answer > 0 {
            parts.push(format!("no answer x{}", self.no_answer));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sent_ms: u64, latency_ms: u64, outcome: Outcome) -> Record {
        Record {
            sent: Duration::from_millis(sent_ms),
            latency: Duration::from_millis(latency_ms),
            outcome,
        }
    }

    #[test]
    fn summaries_count_by_outcome_within_the_window() {
        let records = vec![
            record(0, 5, Outcome::Created(Uuid::nil())),
            record(
                1000,
                2010,
                Outcome::Status {
                    status: 503,
                    json_error: true,
                },
            ),
            record(
                1500,
                3,
                Outcome::Status {
                    status: 500,
                    json_error: false,
                },
            ),
            record(
                2000,
                10_001,
                Outcome::NoAnswer("cannot read the response: no progress".into()),
            ),
            record(9000, 4, Outcome::Created(Uuid::nil())),
        ];
        let all = Summary::of(&records, None);
        assert_eq!(
            (all.sent, all.created, all.no_answer, all.timed_out),
            (5, 2, 1, 1)
        );
        assert_eq!(all.not_json, 1);
        assert_eq!(all.failures(), "500 x1, 503 x1, no answer x1");
        assert_eq!(all.slowest_failure, Some(Duration::from_millis(10_001)));
        let window = Summary::of(
            &records,
            Some((Duration::from_millis(900), Duration::from_millis(1600))),
        );
        assert_eq!((window.sent, window.created), (2, 0));
        assert_eq!(window.slowest_failure, Some(Duration::from_millis(2010)));
        assert_eq!(Summary::of(&records[..1], None).failures(), "none");
        assert_eq!(accepted_ids(&records).len(), 2);
        assert!(is_json_error(br#"{"error":"database unavailable, retry later"}"#));
        assert!(!is_json_error(b"<html>"));
    }
}
