//! The bench checks its own work before it reports a speed: every accepted order is in
//! Postgres, `COMPLETED`, processed exactly once, and nothing is left in the outbox or queues.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postgres::Client;
use txoutbox::{Error, Result};
use txoutbox_service::orders::ORDER_CREATED;
use uuid::Uuid;

use crate::infra::FreshBroker;

/// Most ids passed to one `= ANY($1)`.
const CHUNK: usize = 5_000;
/// How often completion is polled.
const POLL: Duration = Duration::from_millis(200);

const PROGRESS: &str = "\
    SELECT count(*) FILTER (WHERE status = 'COMPLETED'), (SELECT count(*) FROM outbox)
    FROM orders";

const COUNT_ORDERS: &str = "\
    SELECT count(*), count(*) FILTER (WHERE status = 'COMPLETED') FROM orders";

const COUNT_FOUND: &str = "SELECT count(*) FROM orders WHERE id = ANY($1)";

const COUNT_PROCESSED: &str = "\
    SELECT count(*), count(DISTINCT aggregate_id) FROM processed_messages WHERE event_type = $1";

const COUNT_TWICE_PROCESSED: &str = "\
    SELECT count(*) FROM (
        SELECT aggregate_id FROM processed_messages WHERE event_type = $1
        GROUP BY aggregate_id HAVING count(*) > 1
    ) AS twice";

const COUNT_PROCESSED_ORDERS: &str = "\
    SELECT count(*) FROM processed_messages p JOIN orders o ON o.id::text = p.aggregate_id
    WHERE p.event_type = $1";

const COUNT_OUTBOX: &str = "SELECT count(*) FROM outbox";

const LAST_COMPLETED: &str = "\
    SELECT extract(epoch FROM max(updated_at))::float8 FROM orders
    WHERE id = ANY($1) AND status = 'COMPLETED'";

/// One thing the bench checked, and whether it held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// Scenario it belongs to.
    pub phase: String,
    /// What was checked, e.g. `every order COMPLETED`.
    pub what: String,
    /// What was found.
    pub detail: String,
    /// True when it held.
    pub ok: bool,
}

/// Every check of a run, in the order made.
#[derive(Clone, Debug, Default)]
pub struct Checks(pub Vec<Check>);

impl Checks {
    /// Records a check.
    pub fn add(&mut self, phase: &str, what: &str, ok: bool, detail: String) {
        if !ok {
            log::error!("bench: {phase}: check failed: {what}: {detail}");
        }
        self.0.push(Check {
            phase: phase.into(),
            what: what.into(),
            detail,
            ok,
        });
    }

    /// Records that `got` equals `expected`.
    pub fn equal(&mut self, phase: &str, what: &str, expected: u64, got: u64) {
        let detail = if got == expected {
            format!("{got}")
        } else {
            format!("expected {expected}, found {got}")
        };
        self.add(phase, what, got == expected, detail);
    }

    /// True when every check of `phase` held (and there was at least one).
    pub fn phase_ok(&self, phase: &str) -> bool {
        let mut of_phase = self.0.iter().filter(|c| c.phase == phase).peekable();
        of_phase.peek().is_some() && of_phase.all(|c| c.ok)
    }

    /// Checks that failed.
    pub fn failed(&self) -> Vec<&Check> {
        self.0.iter().filter(|c| !c.ok).collect()
    }
}

/// Runs a counting query that returns one row of `bigint`s.
pub fn counts(
    client: &mut Client,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Result<Vec<u64>> {
    let row = client
        .query_one(sql, params)
        .map_err(|e| Error::db("cannot count rows for the verification", e))?;
    Ok((0..row.len())
        .map(|i| row.get::<_, Option<i64>>(i).unwrap_or(0).max(0) as u64)
        .collect())
}

/// Waits until `expected` orders are `COMPLETED` and the outbox is empty; false when
/// `timeout` passes or `stop` is set first.
pub fn wait_until_completed(
    client: &mut Client,
    expected: u64,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let progress = counts(client, PROGRESS, &[])?;
        if progress[0] >= expected && progress[1] == 0 {
            return Ok(true);
        }
        if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
            log::warn!(
                "bench: {} of {expected} orders COMPLETED, {} outbox rows left when waiting ended",
                progress[0],
                progress[1]
            );
            return Ok(false);
        }
        std::thread::sleep(POLL);
    }
}

/// Counts `COMPLETED` orders (for the sampler).
pub fn completed_orders(client: &mut Client) -> Result<u64> {
    Ok(counts(client, PROGRESS, &[])?[0])
}

/// Latest `updated_at` of the completed orders among `ids`, in Unix seconds.
pub fn last_completed_epoch(client: &mut Client, ids: &[Uuid]) -> Result<Option<f64>> {
    let mut last: Option<f64> = None;
    for chunk in ids.chunks(CHUNK) {
        let row = client
            .query_one(LAST_COMPLETED, &[&chunk])
            .map_err(|e| Error::db("cannot read when the orders completed", e))?;
        if let Some(at) = row.get::<_, Option<f64>>(0) {
            last = Some(last.map_or(at, |l| l.max(at)));
        }
    }
    Ok(last)
}

/// Verifies a scenario that sent `ids` (with `errors` failed POSTs) through HTTP, relay and
/// consumer, on a database and queue of its own: nothing lost, nothing done twice, nothing left.
pub fn orders_done_once(
    phase: &str,
    client: &mut Client,
    broker: &FreshBroker,
    ids: &[Uuid],
    errors: usize,
    error_samples: &[String],
    checks: &mut Checks,
) -> Result<()> {
    let accepted = ids.len() as u64;
    checks.add(
        phase,
        "every POST answered 201",
        errors == 0 && accepted > 0,
        if errors == 0 {
            format!("{accepted} accepted")
        } else {
            format!("{errors} failed: {}", error_samples.join("; "))
        },
    );
    let orders = counts(client, COUNT_ORDERS, &[])?;
    let mut found = 0;
    for chunk in ids.chunks(CHUNK) {
        found += counts(client, COUNT_FOUND, &[&chunk])?[0];
    }
    checks.equal(phase, "accepted orders found in Postgres", accepted, found);
    checks.equal(phase, "orders in Postgres (none extra)", accepted, orders[0]);
    checks.equal(phase, "orders COMPLETED", accepted, orders[1]);
    let processed = counts(client, COUNT_PROCESSED, &[&ORDER_CREATED])?;
    checks.equal(
        phase,
        "OrderCreated rows in processed_messages",
        accepted,
        processed[0],
    );
    checks.equal(
        phase,
        "orders with a processed OrderCreated",
        accepted,
        processed[1],
    );
    let twice = counts(client, COUNT_TWICE_PROCESSED, &[&ORDER_CREATED])?[0];
    checks.equal(phase, "orders processed more than once", 0, twice);
    let matched = counts(client, COUNT_PROCESSED_ORDERS, &[&ORDER_CREATED])?[0];
    checks.equal(phase, "processed rows that match an order", accepted, matched);
    let outbox = counts(client, COUNT_OUTBOX, &[])?[0];
    checks.equal(phase, "outbox rows left", 0, outbox);
    let depth = broker.depth()?;
    checks.equal(phase, "messages left in the queue", 0, depth.ready);
    checks.equal(phase, "messages dead-lettered", 0, depth.dead_lettered);
    Ok(())
}

/// Rows in the outbox.
pub fn outbox_rows(client: &mut Client) -> Result<u64> {
    Ok(counts(client, COUNT_OUTBOX, &[])?[0])
}

/// Rows in `orders`.
pub fn order_rows(client: &mut Client) -> Result<u64> {
    Ok(counts(client, COUNT_ORDERS, &[])?[0])
}
