//! Metrics: Prometheus exposition of what the server, the relay and the consumer count, and a
//! lock-free latency histogram for in-process percentiles (the benchmarks' tool).
//!
//! The metrics themselves live where the work happens ([`RelayStats`](crate::relay::RelayStats),
//! [`ConsumerStats`](crate::consumer::ConsumerStats)); each registers its
//! metrics into a [`Registry`], which [`encode`] renders in the Prometheus text format.
//! Embedding the relay or the consumer in your own program:
//!
//! ```no_run
//! # fn demo(relay: &txoutbox::relay::RelayHandle, db: txoutbox::Database) {
//! use txoutbox::metrics;
//!
//! let mut registry = metrics::Registry::default();
//! relay.stats().register(&mut registry);
//! metrics::register_outbox_gauges(&mut registry, db);
//! // In your /metrics handler, answer with Content-Type metrics::CONTENT_TYPE:
//! let body: String = metrics::encode(&registry);
//! # }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;

use crate::admin::{outbox_summary, OutboxSummary};
use crate::db::Database;
use crate::wakeup::FailureLog;
use crate::Result;

/// The `prometheus-client` crate this module builds on, for metrics of your own in the same
/// [`Registry`] without a second dependency to keep in step.
pub use prometheus_client;
/// A set of metrics to render together; see [`encode`].
pub use prometheus_client::registry::Registry;

/// `Content-Type` of [`encode`]'s output: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Renders every metric in `registry` in the Prometheus text format ([`CONTENT_TYPE`]),
/// running its collectors (such as the outbox query of [`register_outbox_gauges`]).
pub fn encode(registry: &Registry) -> String {
    let mut text = String::with_capacity(8 * 1024);
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, registry) {
        // Only a collector can fail here, and ours do not: keep what was written.
        log::error!("metrics: cannot encode the registry: {e}");
    }
    text
}

/// Upper bounds (seconds) of the duration histograms: 0.5 ms to 10 s.
const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram of durations in seconds, with buckets from 0.5 ms to 10 s.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(SECONDS_BUCKETS)
}

/// A `reason` label with a value from a fixed, small set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Reason {
    reason: &'static str,
}

/// A counter family by `reason`, and one counter per reason in `reasons`: each series is
/// exposed from the start (at 0), and counting needs no label lookup.
pub(crate) fn counters_by_reason<const N: usize>(
    reasons: [&'static str; N],
) -> (Family<Reason, Counter>, [Counter; N]) {
    let family = Family::<Reason, Counter>::default();
    let counters = reasons.map(|reason| family.get_or_create(&Reason { reason }).clone());
    (family, counters)
}

/// The bound on the outbox query of one scrape, however long the pool's statement timeout.
const OUTBOX_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Adds gauges read from the outbox table at each scrape: `txoutbox_outbox_backlog`,
/// `txoutbox_outbox_oldest_pending_age_seconds`, `txoutbox_outbox_failed`,
/// `txoutbox_outbox_scheduled`, and `txoutbox_outbox_scrape_error` (1 when the query failed;
/// the others are then left out of that scrape rather than reported stale).
///
/// The query takes one pooled connection and at most 2 s: a database that is down or locked
/// makes the scrape slower by that much, never hang, and the other metrics are still served.
pub fn register_outbox_gauges(registry: &mut Registry, db: Database) {
    registry.register_collector(Box::new(OutboxGauges {
        db,
        failures: Mutex::new(FailureLog::new("metrics")),
    }));
}

#[derive(Debug)]
struct OutboxGauges {
    db: Database,
    failures: Mutex<FailureLog>,
}

impl OutboxGauges {
    fn read(&self) -> Result<OutboxSummary> {
        let context = "cannot read the outbox backlog";
        self.db.read_bounded(OUTBOX_QUERY_TIMEOUT, context, |tx| {
            outbox_summary(tx, self.db.schema())
        })
    }
}

fn encode_gauge<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: N,
) -> std::fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let gauge = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, unit, gauge.metric_type())?;
    gauge.encode(metric)
}

impl Collector for OutboxGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let reading = self.read();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let error: i64 = match reading {
            Ok(reading) => {
                failures.recovered();
                encode_gauge(
                    &mut encoder,
                    "txoutbox_outbox_backlog",
                    "Events in the outbox waiting to be published (not failed), read at scrape time",
                    None,
                    reading.backlog,
                )?;
                encode_gauge(
                    &mut encoder,
                    "txoutbox_outbox_oldest_pending_age_seconds",
                    "Age in seconds of the oldest event waiting to be published, 0 when none",
                    None,
                    reading.oldest_age_secs,
                )?;
                encode_gauge(
                    &mut encoder,
                    "txoutbox_outbox_failed",
                    "Events marked failed after RELAY_MAX_ATTEMPTS refusals, until re-queued",
                    None,
                    reading.failed,
                )?;
                encode_gauge(
                    &mut encoder,
                    "txoutbox_outbox_scheduled",
                    "Events scheduled for later (not_before), not yet moved into the outbox",
                    None,
                    reading.scheduled,
                )?;
                0
            }
            Err(e) => {
                failures.failed(format!("{e}; /metrics leaves the outbox gauges out meanwhile"));
                1
            }
        };
        encode_gauge(
            &mut encoder,
            "txoutbox_outbox_scrape_error",
            "1 when the outbox could not be read for this scrape (see the log), else 0",
            None,
            error,
        )
    }
}

/// Measures a span of work for a histogram in seconds.
pub(crate) fn observe_since(histogram: &Histogram, started: Instant) {
    histogram.observe(started.elapsed().as_secs_f64());
}

/// Buckets per power of two: 8 gives at most ~9% relative error on a percentile.
const SUB_BUCKETS: u32 = 8;
/// Powers of two covered, from 1 µs up to 2^40 µs (about 12 days).
const OCTAVES: u32 = 40;
const BUCKETS: usize = (SUB_BUCKETS * OCTAVES) as usize;

/// A histogram of durations in log-linear microsecond buckets, safe to share between threads.
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    max_micros: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            max_micros: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count())
            .finish()
    }
}

fn bucket_of(micros: u64) -> usize {
    let micros = micros.max(1);
    let octave = 63 - micros.leading_zeros(); // floor(log2)
    let sub = if octave >= 3 {
        (micros >> (octave - 3)) & 7
    } else {
        (micros << (3 - octave)) & 7
    };
    ((octave * SUB_BUCKETS) as usize + sub as usize).min(BUCKETS - 1)
}

fn upper_bound_of(bucket: usize) -> u64 {
    let octave = bucket as u32 / SUB_BUCKETS;
    let sub = bucket as u64 % SUB_BUCKETS as u64;
    // Bucket covers [2^octave * (8 + sub) / 8, 2^octave * (9 + sub) / 8).
    ((1u64 << octave) * (9 + sub)).div_ceil(8)
}

impl LatencyHistogram {
    /// Adds one observation.
    pub fn record(&self, value: Duration) {
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_micros.fetch_max(micros, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Largest observation so far.
    pub fn max(&self) -> Duration {
        Duration::from_micros(self.max_micros.load(Ordering::Relaxed))
    }

    /// The `p`-th percentile (0.0..=100.0), as the upper bound of its bucket; zero when empty.
    pub fn percentile(&self, p: f64) -> Duration {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_micros(upper_bound_of(bucket)).min(self.max());
            }
        }
        self.max()
    }

    /// Forgets every observation.
    pub fn reset(&self) {
        self.buckets.iter().for_each(|b| b.store(0, Ordering::Relaxed));
        self.count.store(0, Ordering::Relaxed);
        self.max_micros.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_a_bucket_of_the_truth() {
        let h = LatencyHistogram::default();
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms));
        }
        for (p, truth) in [(50.0, 500.0), (99.0, 990.0), (100.0, 1000.0)] {
            let got = h.percentile(p).as_secs_f64() * 1000.0;
            assert!(
                (got - truth).abs() / truth < 0.13,
                "p{p}: {got} ms, expected about {truth}"
            );
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.max(), Duration::from_millis(1000));
        h.reset();
        assert_eq!(h.percentile(50.0), Duration::ZERO);
    }

    #[test]
    fn buckets_are_monotonic() {
        let mut last = 0;
        for micros in [1, 2, 3, 7, 8, 9, 15, 16, 17, 100, 1_000, 65_536, 1 << 30] {
            let b = bucket_of(micros);
            assert!(b >= last, "{micros}");
            assert!(upper_bound_of(b) >= micros, "{micros} above its bucket's bound");
            last = b;
        }
    }
}
