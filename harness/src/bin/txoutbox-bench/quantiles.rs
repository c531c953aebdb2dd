//! Latency percentiles as the bench reports them.

use std::time::Duration;

use txoutbox::metrics::LatencyHistogram;

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
    /// From a histogram (each percentile is its bucket's upper bound, within ~9%).
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
