//! The status page: `GET /` serves one self-contained HTML page that polls `GET /status.json`
//! for orders by status, the outbox backlog and its oldest age, the failed events, the
//! dead-letter queue's depth, and events published per second over the last ten minutes. Its
//! buttons call the operator actions of [`crate::http`] (retry failed events, replay dead letters).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};
use serde_json::{json, Map, Value};

use txoutbox::admin::{self, outbox_summary};
use txoutbox::db::Database;
use txoutbox::relay::RelayHealth;
use txoutbox::{Error, Result};

/// The page itself: inline CSS and vanilla JS, no external assets.
pub(crate) const PAGE: &str = include_str!("status.html");

/// How often the sampler reads the relay's published counter.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Rates kept: ten minutes at one per [`SAMPLE_INTERVAL`].
const HISTORY: usize = 600;

/// Figures this fresh are served again instead of querying, whatever the number of viewers.
const CACHE_FOR: Duration = Duration::from_secs(1);

/// Figures are also kept for this many times as long as reading them took, so that the page
/// costs the database at most a tenth of one connection's time however large `orders` grows.
const CACHE_PER_QUERY_TIME: u32 = 10;

/// Bound on the status queries: the page must answer fast even on a slow database.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// One pass over `orders`: a scan of the table, cheap at thousands of rows (docs/operating.md, Status page).
const ORDERS_BY_STATUS: &str = "SELECT status, count(*) FROM orders GROUP BY status";

/// Failed events listed at most (oldest first); the count shows them all.
const FAILED_LISTED: i64 = 20;

/// How often the sampler reads the dead-letter queue's depth from RabbitMQ.
const DEAD_LETTER_INTERVAL: Duration = Duration::from_secs(5);

/// Order statuses the page always shows, even at zero.
const STATUSES: [&str; 3] = ["PENDING", "COMPLETED", "CANCELLED"];

/// Cumulative published counts, one per sample, oldest first.
#[derive(Default)]
struct History(Mutex<VecDeque<(Instant, u64)>>);

impl History {
    fn record(&self, at: Instant, published: u64) {
        let mut samples = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() > HISTORY {
            samples.pop_front();
        }
        samples.push_back((at, published));
    }

    /// Events per second between consecutive samples, oldest first.
    fn rates(&self) -> Vec<f64> {
        let samples = self.0.lock().unwrap_or_else(|p| p.into_inner());
        samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|((t0, c0), (t1, c1))| {
                let secs = t1.duration_since(*t0).as_secs_f64().max(1e-3);
                // Two decimals are plenty for a chart and keep the JSON small.
                (c1.saturating_sub(*c0) as f64 / secs * 100.0).round() / 100.0
            })
            .collect()
    }
}

/// The thread that samples the relay's counter; stopped and joined when dropped.
pub(crate) struct Sampler {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread at once.
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("status: the sampler thread panicked");
            }
        }
    }
}

/// Where the server reaches RabbitMQ for the dead-letter queue: its depth on the status page
/// and `POST /dead-letters/replay`.
#[derive(Clone)]
pub struct BrokerAccess {
    /// `AMQP_URL` (it may hold a password: never logged).
    pub amqp_url: String,
    /// The exchange and queues of the relay and consumer.
    pub topology: txoutbox::Topology,
}

/// The dead-letter queue's depth as last read, or why it could not be read.
#[derive(Default)]
pub(crate) struct DeadLetters(Mutex<Option<std::result::Result<u32, String>>>);

impl DeadLetters {
    /// Reads the depth from RabbitMQ now and keeps it.
    pub(crate) fn read(&self, broker: &BrokerAccess) {
        let depth = admin::dead_letter_depth(&broker.amqp_url, &broker.topology).map_err(|e| e.to_string());
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(depth);
    }

    fn to_json(&self) -> Value {
        match &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            None => json!({ "depth": null, "error": null }),
            Some(Ok(depth)) => json!({ "depth": depth, "error": null }),
            Some(Err(e)) => json!({ "depth": null, "error": e }),
        }
    }
}

/// What `GET /status.json` reports, shared by the HTTP threads.
pub(crate) struct StatusPage {
    db: Database,
    relay: Option<RelayHealth>,
    /// `None` when the server was given no broker access: no dead-letter figures or replay.
    broker: Option<BrokerAccess>,
    dead_letters: Arc<DeadLetters>,
    /// Whether the operator actions need the API token (the page then asks for it).
    auth_required: bool,
    history: Arc<History>,
    /// The last database figures and until when they are served; the lock also makes
    /// concurrent viewers wait for one query instead of each running their own.
    cached: Mutex<Option<(Instant, Value)>>,
}

impl StatusPage {
    /// The page's state, and the sampler thread when a relay runs in this process or the
    /// broker is given.
    pub(crate) fn start(
        db: Database,
        relay: Option<RelayHealth>,
        broker: Option<BrokerAccess>,
        auth_required: bool,
    ) -> Result<(StatusPage, Option<Sampler>)> {
        let history = Arc::new(History::default());
        let dead_letters = Arc::new(DeadLetters::default());
        let sampler = if relay.is_some() || broker.is_some() {
            Some(start_sampler(
                relay.clone(),
                broker.clone(),
                history.clone(),
                dead_letters.clone(),
            )?)
        } else {
            None
        };
        let page = StatusPage {
            db,
            relay,
            broker,
            dead_letters,
            auth_required,
            history,
            cached: Mutex::new(None),
        };
        Ok((page, sampler))
    }

    /// The broker access the server was given, if any.
    pub(crate) fn broker(&self) -> Option<&BrokerAccess> {
        self.broker.as_ref()
    }

    /// Reads the dead-letter queue's depth again now (after a replay).
    pub(crate) fn refresh_dead_letters(&self) {
        if let Some(broker) = &self.broker {
            self.dead_letters.read(broker);
        }
    }

    /// Drops the cached database figures, so that the next view shows an action's effect.
    pub(crate) fn invalidate(&self) {
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The figures as JSON. Always an answer: a database failure is reported in
    /// `database_error`, with the relay's own figures still there.
    pub(crate) fn snapshot(&self) -> Value {
        let database = self.database_figures();
        let relay = self.relay.as_ref().map(|health| {
            json!({
                "workers": health.workers(),
                "connected_workers": health.connected_workers(),
                "published_total": health.published(),
            })
        });
        let rates = self.relay.as_ref().map(|_| self.history.rates());
        let current = rates.as_ref().and_then(|r| r.last().copied());
        let mut body = json!({
            "orders": Value::Null,
            "outbox": Value::Null,
            "database_error": Value::Null,
            "relay": relay,
            "dead_letters": self.broker.as_ref().map(|_| self.dead_letters.to_json()),
            "failed_events": Value::Null,
            "auth_required": self.auth_required,
            "events_per_sec": {
                "interval_secs": SAMPLE_INTERVAL.as_secs(),
                "window_secs": HISTORY as u64 * SAMPLE_INTERVAL.as_secs(),
                "current": current,
                "rates": rates,
            },
        });
        match database {
            Ok(figures) => {
                body["orders"] = figures["orders"].clone();
                body["outbox"] = figures["outbox"].clone();
                body["failed_events"] = figures["failed_events"].clone();
            }
            Err(e) => body["database_error"] = Value::String(e.to_string()),
        }
        body
    }

    fn database_figures(&self) -> Result<Value> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((until, figures)) = cached.as_ref() {
            if Instant::now() < *until {
                return Ok(figures.clone());
            }
        }
        let started = Instant::now();
        let figures = self.query()?;
        let keep = CACHE_FOR.max(started.elapsed() * CACHE_PER_QUERY_TIME);
        *cached = Some((Instant::now() + keep, figures.clone()));
        Ok(figures)
    }

    fn query(&self) -> Result<Value> {
        let context = "cannot read the status figures";
        self.db.read_bounded(QUERY_TIMEOUT, context, |tx| {
            let mut orders: Map<String, Value> = STATUSES.iter().map(|s| (s.to_string(), json!(0))).collect();
            for row in tx
                .query(ORDERS_BY_STATUS, &[])
                .map_err(|e| Error::db(context, e))?
            {
                orders.insert(row.get(0), json!(row.get::<_, i64>(1)));
            }
            let outbox = outbox_summary(tx, self.db.schema())?;
            let failed: Vec<Value> = self
                .db
                .outbox()
                .failed_events(tx, FAILED_LISTED)?
                .into_iter()
                .map(|event| {
                    json!({
                        "id": event.id,
                        "message_id": event.message_id.to_string(),
                        "event_type": event.event_type,
                        "aggregate_id": event.aggregate_id,
                        "attempts": event.attempts,
                        "last_error": event.last_error,
                        "age_secs": event.age_secs.round(),
                    })
                })
                .collect();
            Ok(json!({
                "failed_events": failed,
                "orders": orders,
                "outbox": {
                    "backlog": outbox.backlog,
                    "oldest_age_secs": (outbox.oldest_age_secs * 10.0).round() / 10.0,
                    "failed": outbox.failed,
                    "scheduled": outbox.scheduled,
                    "next_due_secs": outbox.next_due_secs.map(|s| (s * 10.0).round() / 10.0),
                },
            }))
        })
    }
}

/// Samples the relay's published counter every [`SAMPLE_INTERVAL`] and the dead-letter
/// queue's depth every [`DEAD_LETTER_INTERVAL`], on one thread.
fn start_sampler(
    relay: Option<RelayHealth>,
    broker: Option<BrokerAccess>,
    history: Arc<History>,
    dead_letters: Arc<DeadLetters>,
) -> Result<Sampler> {
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let thread = std::thread::Builder::new()
        .name("status-sampler".into())
        .spawn(move || {
            let mut dead_letters_read: Option<Instant> = None;
            loop {
                if let Some(health) = &relay {
                    history.record(Instant::now(), health.published());
                }
                if let Some(broker) = &broker {
                    if dead_letters_read.map_or(true, |at| at.elapsed() >= DEAD_LETTER_INTERVAL) {
                        dead_letters.read(broker);
                        dead_letters_read = Some(Instant::now());
                    }
                }
                match stopped.recv_timeout(SAMPLE_INTERVAL) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        })
        .map_err(|e| Error::Other(format!("cannot start the status sampler thread: {e}")))?;
    Ok(Sampler {
        stop: Some(stop),
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_between_samples_and_bounded_to_the_window() {
        let history = History::default();
        let start = Instant::now();
        history.record(start, 0);
        history.record(start + Duration::from_secs(1), 50);
        history.record(start + Duration::from_secs(3), 250);
        assert_eq!(history.rates(), vec![50.0, 100.0]);
        for n in 0..2 * HISTORY as u64 {
            history.record(start + Duration::from_secs(4 + n), 250 + n);
        }
        let rates = history.rates();
        assert_eq!(rates.len(), HISTORY);
        assert!(rates.iter().all(|r| *r == 1.0), "{rates:?}");
    }
}
