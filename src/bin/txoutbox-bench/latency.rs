//! (6) Pickup latency at half the database ceiling, offered open-loop: commit -> broker confirm
//! from the relay's own histogram (API and relay run in this process, composed as the server
//! composes them), commit -> `COMPLETED` from Postgres, and the client's latency from each
//! order's scheduled instant.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use postgres::Client;
use txoutbox::metrics::LatencyHistogram;
use txoutbox::{Error, Result};

use crate::infra::Infra;
use crate::load::{open_loop, LATE_AFTER};
use crate::options::Plan;
use crate::pipeline::{interrupted, order_sampler};
use crate::process::{wait_consuming, Kind, Launcher};
use crate::sampler::Line;
use crate::server::{server_pool_size, Stack};
use crate::verify::{self, Checks};

/// Phase name of (6).
pub const LATENCY_PHASE: &str = "latency at half load";

/// Threads sending on the schedule, each with its own connection. Far more than the orders in
/// flight at half load; when they are all busy anyway, the late orders still count from their
/// due instant.
pub const OPEN_LOOP_SENDERS: usize = 64;

/// Percentiles of "time from the order's transaction to ..." (and commit, COMPLETED).
const COMPLETION_QUANTILES: &str = "\
    SELECT percentile_cont(ARRAY[0.5, 0.9, 0.99, 0.999])
               WITHIN GROUP (ORDER BY extract(epoch FROM updated_at - created_at)::float8),
           extract(epoch FROM max(updated_at - created_at))::float8
    FROM orders WHERE status = 'COMPLETED'";

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

/// What (6) measured.
#[derive(Clone, Debug, Default)]
pub struct Latency {
    /// Orders per second offered (half the database ceiling).
    pub offered_rate: f64,
    /// Orders per second accepted over the run.
    pub achieved_rate: f64,
    /// Orders the schedule had.
    pub scheduled: usize,
    /// Orders accepted.
    pub accepted: usize,
    /// Orders sent more than 1 ms after their due instant.
    pub late: usize,
    /// Order transaction -> broker confirm (relay histogram).
    pub confirm: Quantiles,
    /// Order transaction -> `COMPLETED` (Postgres timestamps).
    pub completed: Quantiles,
    /// Scheduled instant -> HTTP answer (client).
    pub http: Quantiles,
    /// Accepted and completed orders per second.
    pub lines: Vec<Line>,
}

/// Offers `rate` orders per second to an in-process API and relay, with a consumer process.
pub fn run(
    infra: &Infra,
    launcher: &Launcher,
    plan: &Plan,
    rate: f64,
    stop: &AtomicBool,
    checks: &mut Checks,
) -> Result<Latency> {
    let fresh = infra.fresh_db("latency", server_pool_size())?;
    let broker = infra.fresh_broker("latency")?;
    let stack = Stack::start(&fresh, &broker, &infra.amqp_url)?;
    let mut consumer = launcher.spawn(Kind::Consumer, "latency-consumer", &fresh, &broker, None)?;
    wait_consuming(&broker, 1, &mut [&mut consumer])?;

    let accepted = Arc::new(AtomicU64::new(0));
    let sampler = order_sampler(&fresh, accepted.clone(), plan.sample_interval)?;
    let outcome = open_loop(&stack.url(), rate, plan.latency, OPEN_LOOP_SENDERS, &accepted, stop)?;
    let mut client = fresh.client()?;
    verify::wait_until_completed(&mut client, outcome.load.ids.len() as u64, plan.completion_timeout, stop)?;
    let lines = sampler.finish();
    consumer.check_alive()?;
    interrupted(stop)?;

    let load = &outcome.load;
    verify::orders_done_once(LATENCY_PHASE, &mut client, &broker, &load.ids, load.errors, &load.error_samples, checks)?;
    let confirms = stack.relay().stats().confirm_latency();
    checks.equal(LATENCY_PHASE, "events confirmed (relay histogram)", load.ids.len() as u64, confirms.count());
    checks.equal(LATENCY_PHASE, "orders sent on schedule", outcome.scheduled as u64, (load.ids.len() + load.errors) as u64);
    if outcome.late > 0 {
        log::info!(
            "bench: {} of {} orders went out more than {} ms late",
            outcome.late,
            outcome.scheduled,
            LATE_AFTER.as_millis()
        );
    }
    Ok(Latency {
        offered_rate: rate,
        achieved_rate: load.rate(),
        scheduled: outcome.scheduled,
        accepted: load.ids.len(),
        late: outcome.late,
        confirm: Quantiles::of_histogram(confirms),
        completed: completion_quantiles(&mut client)?,
        http: Quantiles::of_histogram(&outcome.latency),
        lines,
    })
}

/// Percentiles of `updated_at - created_at` of the completed orders.
fn completion_quantiles(client: &mut Client) -> Result<Quantiles> {
    let row = client
        .query_one(COMPLETION_QUANTILES, &[])
        .map_err(|e| Error::db("cannot compute the completion latencies", e))?;
    let percentiles: Option<Vec<Option<f64>>> = row.get(0);
    let max: Option<f64> = row.get(1);
    let seconds = |value: Option<f64>| {
        Duration::from_secs_f64(value.filter(|v| v.is_finite() && *v >= 0.0).unwrap_or(0.0))
    };
    let at = |i: usize| seconds(percentiles.as_ref().and_then(|p| p.get(i).copied().flatten()));
    Ok(Quantiles {
        p50: at(0),
        p90: at(1),
        p99: at(2),
        p999: at(3),
        max: seconds(max),
    })
}
