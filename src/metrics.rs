//! Lock-free latency histograms, cheap enough for every event on the hot path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
