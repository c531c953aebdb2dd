//! (6) Pickup latency below saturation: orders offered open-loop at 25% and at 50% of the
//! end-to-end rate (5) of the same run, commit -> broker confirm from the relay's own histogram
//! (API and relay run in this process, composed as the server composes them), commit ->
//! `COMPLETED` from Postgres, and the client's latency from each order's scheduled instant.
//!
//! A share of (5), not of the database ceiling (1): (5) is what the whole pipeline sustains on
//! this machine, so half of it leaves the pipeline idle half the time and the latency measured is
//! the pipeline's own, not time spent queueing behind a saturated one.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use postgres::Client;
use txoutbox::{Error, Result};

use crate::cpu::{CpuUsage, Snapshot};
use crate::infra::Infra;
use crate::load::{open_loop, per_second, Schedule, LATE_AFTER};
use crate::options::Plan;
use crate::pipeline::{interrupted, order_sampler};
use crate::process::{wait_consuming, Kind, Launcher};
use crate::quantiles::Quantiles;
use crate::sampler::Line;
use crate::server::{server_pool_size, Stack};
use crate::verify::{self, Checks};

/// One load level of (6): a share of the end-to-end rate (5), and the phase name of its checks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Level {
    /// Share of (5) offered, e.g. 0.5.
    pub share: f64,
    /// Phase name of its checks.
    pub phase: &'static str,
}

/// The levels (6) runs at, in order; the targets are judged at [`JUDGED_LEVEL`].
pub const LEVELS: [Level; 2] = [
    Level {
        share: 0.25,
        phase: "latency at 25% of (5)",
    },
    Level {
        share: 0.5,
        phase: "latency at 50% of (5)",
    },
];

/// The level of [`LEVELS`] at which the latency targets apply: 50% of (5).
pub const JUDGED_LEVEL: Level = LEVELS[1];

/// Threads sending on the schedule, each with its own connection. Far more than the orders in
/// flight at half load; when they are all busy anyway, the late orders still count from their
/// due instant.
pub const OPEN_LOOP_SENDERS: usize = 64;

/// Percentiles of order transaction -> `COMPLETED` of the orders created from `$1` on.
const COMPLETION_QUANTILES: &str = "\
    SELECT percentile_cont(ARRAY[0.5, 0.9, 0.99, 0.999])
               WITHIN GROUP (ORDER BY extract(epoch FROM updated_at - created_at)::float8),
           extract(epoch FROM max(updated_at - created_at))::float8
    FROM orders WHERE status = 'COMPLETED' AND created_at >= $1";

/// What (6) measured at one level.
#[derive(Clone, Debug)]
pub struct Latency {
    /// The level: its share of (5) and its phase name.
    pub level: Level,
    /// Orders per second offered (`level.share` of (5)).
    pub offered_rate: f64,
    /// Orders per second accepted over the measured part.
    pub achieved_rate: f64,
    /// Orders the schedule had in the measured part.
    pub scheduled: usize,
    /// Orders of the measured part accepted.
    pub accepted: usize,
    /// Orders of the measured part sent more than 1 ms after their due instant.
    pub late: usize,
    /// Order transaction -> broker confirm (relay histogram, reset when measuring starts).
    pub confirm: Quantiles,
    /// Order transaction -> `COMPLETED` (Postgres timestamps).
    pub completed: Quantiles,
    /// Scheduled instant -> HTTP answer (client).
    pub http: Quantiles,
    /// Accepted and completed orders per second.
    pub lines: Vec<Line>,
    /// CPU used while the orders were sent (warm-up included).
    pub cpu: CpuUsage,
}

/// Offers `rate` orders per second (`level.share` of (5)) to an in-process API and relay, with a
/// consumer process; measures after `plan.latency_warm_up` at the same rate.
pub fn run(
    infra: &Infra,
    launcher: &Launcher,
    plan: &Plan,
    level: Level,
    rate: f64,
    stop: &AtomicBool,
    checks: &mut Checks,
) -> Result<Latency> {
    let phase = level.phase;
    let fresh = infra.fresh_db("latency", server_pool_size())?;
    let broker = infra.fresh_broker("latency")?;
    let stack = Stack::start(&fresh, &broker, &infra.amqp_url)?;
    let name = format!("latency-{:.0}-consumer", level.share * 100.0);
    let mut consumer = launcher.spawn(Kind::Consumer, &name, &fresh, &broker, None)?;
    wait_consuming(&broker, 1, &mut [&mut consumer])?;

    let accepted = Arc::new(AtomicU64::new(0));
    let sampler = order_sampler(&fresh, accepted.clone(), plan.sample_interval)?;
    let schedule = Schedule {
        rate,
        warm_up: plan.latency_warm_up,
        duration: plan.latency,
        bucket: None,
    };
    let measured_from = Mutex::new(None);
    let confirms = stack.relay().stats().confirm_latency();
    let start_measuring = || {
        confirms.reset();
        *measured_from.lock().unwrap_or_else(|p| p.into_inner()) = Some(SystemTime::now());
    };
    let before = Snapshot::take();
    let outcome = open_loop(
        &stack.url(),
        schedule,
        OPEN_LOOP_SENDERS,
        &accepted,
        stop,
        &start_measuring,
    )?;
    let cpu = before.until(&Snapshot::take());
    let mut client = fresh.client()?;
    verify::wait_until_completed(
        &mut client,
        outcome.load.ids.len() as u64,
        plan.completion_timeout,
        stop,
    )?;
    let lines = sampler.finish();
    consumer.check_alive()?;
    interrupted(stop)?;
    let measured_from = measured_from
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .ok_or_else(|| Error::Other("the open loop never reached its measured part".into()))?;

    let load = &outcome.load;
    verify::orders_done_once(
        phase,
        &mut client,
        &broker,
        &load.ids,
        load.errors,
        &load.error_samples,
        checks,
    )?;
    checks.equal(
        phase,
        "events published by the relay",
        load.ids.len() as u64,
        stack.relay().stats().published(),
    );
    checks.equal(
        phase,
        "orders sent on the schedule (warm-up included)",
        (outcome.warm_up_orders + outcome.scheduled) as u64,
        (load.ids.len() + load.errors) as u64,
    );
    if outcome.late > 0 {
        log::info!(
            "bench: {} of {} orders went out more than {} ms late",
            outcome.late,
            outcome.scheduled,
            LATE_AFTER.as_millis()
        );
    }
    Ok(Latency {
        level,
        offered_rate: rate,
        achieved_rate: per_second(outcome.measured_accepted as u64, outcome.measured_elapsed),
        scheduled: outcome.scheduled,
        accepted: outcome.measured_accepted,
        late: outcome.late,
        confirm: Quantiles::of_histogram(confirms),
        completed: completion_quantiles(&mut client, measured_from)?,
        http: Quantiles::of_hdr(&outcome.latency),
        lines,
        cpu,
    })
}

/// Percentiles of `updated_at - created_at` of the orders created from `since` on.
fn completion_quantiles(client: &mut Client, since: SystemTime) -> Result<Quantiles> {
    let row = client
        .query_one(COMPLETION_QUANTILES, &[&since])
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
