//! Latency percentiles as the bench reports them.

use std::time::Duration;

use hdrhistogram::Histogram;
use txoutbox::metrics::LatencyHistogram;

/// A histogram of the bench's own latencies, in microseconds, from 1 µs to an hour at three
/// significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds that hdrhistogram accepts")
}

/// Records `latency` into a [`histogram`] (values past its bounds count as its largest).
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    histogram.saturating_record(latency.as_micros().try_into().unwrap_or(u64::MAX).max(1));
}

/// Latency percentiles.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Quantiles {
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Largest.
    pub max: Duration,
}

impl Quantiles {
    /// From one of the bench's own histograms ([`histogram`]), to within 0.1%.
    pub fn of_hdr(histogram: &Histogram<u64>) -> Quantiles {
        let at = |q: f64| Duration::from_micros(histogram.value_at_quantile(q));
        Quantiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: Duration::from_micros(histogram.max()),
        }
    }

    /// From the library's histogram, which the relay records commit -> confirm into (each
    /// percentile is its bucket's upper bound, within ~9%).
    pub fn of_histogram(histogram: &LatencyHistogram) -> Quantiles {
        Quantiles {
            p50: histogram.percentile(50.0),
            p90: histogram.percentile(90.0),
            p99: histogram.percentile(99.0),
            p999: histogram.percentile(99.9),
            max: histogram.max(),
        }
    }

    /// As (label, value) pairs, in order.
    pub fn labelled(&self) -> [(&'static str, Duration); 5] {
        [
            ("p50", self.p50),
            ("p90", self.p90),
            ("p99", self.p99),
            ("p99.9", self.p999),
            ("max", self.max),
        ]
    }
}
