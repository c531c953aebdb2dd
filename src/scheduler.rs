//! Scheduled events ([`NewEvent::not_before`](crate::NewEvent::not_before)): each relay runs one
//! thread that moves the events that have come due from `outbox_scheduled` into the outbox,
//! then sleeps until the next one is due, or a poll interval at most.

use std::time::Duration;

use postgres::GenericClient;

use crate::db::Database;
use crate::schema::Schema;
use crate::wakeup::{Backoff, FailureLog, Wakeup};
use crate::{Error, Result};

/// Events moved per transaction.
const RELEASE_BATCH: i64 = 1000;

/// Moves up to `$1` due events, oldest not-before first, into the outbox; returns how many were
/// due and how many were moved (an event whose message id is already in the outbox is dropped:
/// it would be a duplicate). Each aggregate's advisory lock is taken first, in sorted order, as
/// `enqueue_many_ordered` does, so the moved rows' ids follow commit order within their
/// aggregates. Rows another relay is moving are skipped.
const RELEASE_DUE: &str = "\
    WITH due AS (
        DELETE FROM {schema}.outbox_scheduled
        WHERE id IN (SELECT id FROM {schema}.outbox_scheduled
                     WHERE not_before <= now()
                     ORDER BY not_before, id
                     LIMIT $1
                     FOR UPDATE SKIP LOCKED)
        RETURNING *
    ),
    locked AS MATERIALIZED (
        SELECT count(pg_advisory_xact_lock(hashtextextended(length(k.t) || ':' || k.t || k.i, 0))) AS n
        FROM (SELECT DISTINCT aggregate_type AS t, aggregate_id AS i FROM due ORDER BY 1, 2) k
    ),
    moved AS (
        INSERT INTO {schema}.outbox (message_id, aggregate_type, aggregate_id, event_type, payload,
                                     exchange, routing_key, traceparent, tracestate)
        SELECT d.message_id, d.aggregate_type, d.aggregate_id, d.event_type, d.payload,
               d.exchange, d.routing_key, d.traceparent, d.tracestate
        FROM due d CROSS JOIN locked
        ORDER BY d.not_before, d.id
        ON CONFLICT (message_id) DO NOTHING
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM due), (SELECT count(*) FROM moved)";

/// Seconds until the next scheduled event is due (negative when overdue), `NULL` when none.
const NEXT_DUE: &str = "\
    SELECT extract(epoch FROM min(not_before) - clock_timestamp())::float8
    FROM {schema}.outbox_scheduled";

/// Events waiting in `outbox_scheduled`, and seconds until the first is due.
const SCHEDULED_STATUS: &str = "\
    SELECT count(*), extract(epoch FROM min(not_before) - now())::float8
    FROM {schema}.outbox_scheduled";

/// What waits in `outbox_scheduled`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduledSummary {
    /// Events scheduled and not yet due (or due and not yet moved).
    pub waiting: i64,
    /// Seconds until the first of them is due (negative when overdue); `None` when none waits.
    pub next_due_secs: Option<f64>,
}

/// Reads the [`ScheduledSummary`] (a count of `outbox_scheduled`, which scans it).
pub fn scheduled_summary(client: &mut impl GenericClient, schema: &Schema) -> Result<ScheduledSummary> {
    let row = client
        .query_one(schema.qualify(SCHEDULED_STATUS).as_str(), &[])
        .map_err(|e| Error::db("cannot read the scheduled events", e))?;
    Ok(ScheduledSummary {
        waiting: row.get(0),
        next_due_secs: row.get(1),
    })
}

/// Moves every event that has come due into the outbox, 1,000 per transaction;
/// returns how many were moved. The relay does this by itself; call it to release due events
/// without a running relay (an admin task, a test).
pub fn release_due(client: &mut impl GenericClient, schema: &Schema) -> Result<u64> {
    let statement = schema.qualify(RELEASE_DUE);
    let mut moved_total = 0;
    loop {
        let row = client
            .query_one(statement.as_str(), &[&RELEASE_BATCH])
            .map_err(|e| Error::db("cannot move due scheduled events into the outbox", e))?;
        let (due, moved): (i64, i64) = (row.get(0), row.get(1));
        if moved < due {
            log::warn!(
                "relay-schedule: {} due event(s) had a message id already in the outbox and were dropped",
                due - moved
            );
        }
        moved_total += moved as u64;
        if due < RELEASE_BATCH {
            return Ok(moved_total);
        }
    }
}

/// The scheduler thread: release what is due, wake the relay's workers when anything moved,
/// then sleep until the next event is due, at most `poll_interval` (so events scheduled by other
/// processes meanwhile are seen within it). Never polls faster than every 10 ms.
pub(crate) fn release_loop(db: &Database, wakeup: &Wakeup, poll_interval: Duration, mut backoff: Backoff) {
    const MIN_SLEEP: Duration = Duration::from_millis(10);
    let mut failures = FailureLog::new("relay-schedule");
    let mut client: Option<postgres::Client> = None;
    let next_due = db.schema().qualify(NEXT_DUE);
    while !wakeup.is_stopping() {
        if client.as_ref().map_or(true, postgres::Client::is_closed) {
            match db.dedicated() {
                Ok(connected) => client = Some(connected),
                Err(e) => {
                    failures.failed(e);
                    wakeup.sleep(backoff.next_delay());
                    continue;
                }
            }
        }
        let Some(connection) = client.as_mut() else {
            continue;
        };
        let round = release_due(connection, db.schema()).and_then(|moved| {
            let row = connection
                .query_one(next_due.as_str(), &[])
                .map_err(|e| Error::db("cannot read when the next scheduled event is due", e))?;
            Ok((moved, row.get::<_, Option<f64>>(0)))
        });
        match round {
            Ok((moved, next)) => {
                failures.recovered();
                backoff.reset();
                if moved > 0 {
                    log::debug!("relay-schedule: moved {moved} due event(s) into the outbox");
                    wakeup.notify();
                }
                let until_due = next.map_or(poll_interval, |secs| {
                    Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(poll_interval)
                });
                wakeup.sleep(until_due.clamp(MIN_SLEEP, poll_interval.max(MIN_SLEEP)));
            }
            Err(e) => {
                failures.failed(e);
                wakeup.sleep(backoff.next_delay());
            }
        }
    }
}
