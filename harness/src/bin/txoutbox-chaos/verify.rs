//! After a case: wait (with a deadline) until every order is in its final state (`COMPLETED`,
//! or `CANCELLED` for the orders the case cancelled) and the outbox is empty, then count what
//! happened to the accepted orders, in Postgres.

use std::time::{Duration, Instant};

use postgres::Client;
use txoutbox::{Error, Result};
use txoutbox_service::orders::{ORDER_CANCELLED, ORDER_CREATED};
use uuid::Uuid;

use crate::world::ChaosDb;

/// Most ids passed to one `= ANY($1)`.
const CHUNK: usize = 5_000;
/// How often the drain is polled.
const POLL: Duration = Duration::from_millis(250);

/// Of the orders `$1`, those in status `$2`, and those found.
const COUNT_ACCEPTED: &str = "\
    SELECT count(*) FILTER (WHERE status = $2), count(*) FROM orders WHERE id = ANY($1)";
const COUNT_ALL_ORDERS: &str = "SELECT count(*), count(*) FILTER (WHERE status = 'PENDING') FROM orders";
const COUNT_OUTBOX: &str = "SELECT count(*), count(*) FILTER (WHERE failed_at IS NOT NULL) FROM outbox";
const COUNT_PROCESSED: &str = "\
    SELECT count(*) FROM processed_messages WHERE event_type = $2 AND aggregate_id = ANY($1::text[])";
/// Orders with more than one processed event of one type (two `OrderCreated`, two
/// `OrderCancelled`), and the extra rows.
const DOUBLED_PROCESSED: &str = "\
    SELECT count(*), coalesce(sum(n - 1), 0)::bigint FROM (
        SELECT count(*) AS n FROM processed_messages
        GROUP BY event_type, aggregate_id HAVING count(*) > 1) doubled";
/// Orders that changed to one status more than once (audit trigger), and the extra changes.
/// `PENDING -> COMPLETED -> CANCELLED` is two changes of two events, not a double.
const DOUBLED_EFFECTS: &str = "\
    SELECT count(*), coalesce(sum(n - 1), 0)::bigint FROM (
        SELECT count(*) AS n FROM chaos_effects
        GROUP BY order_id, new_status HAVING count(*) > 1) doubled";
/// Status changes out of `CANCELLED` (audit trigger): a cancellation undone.
const UNDONE_CANCELS: &str = "SELECT count(*) FROM chaos_effects WHERE old_status = 'CANCELLED'";
/// Deliveries that reached the consumer's transaction more than once (audit trigger).
const REDELIVERED: &str = "SELECT count(*) - count(DISTINCT message_id) FROM chaos_deliveries";

/// The orders a case had answered 201, by the state each must end in.
#[derive(Clone, Copy, Debug, Default)]
pub struct Accepted<'a> {
    /// Orders that must end `COMPLETED`.
    pub completed: &'a [Uuid],
    /// Orders the case cancelled (answered 200 or 409), which must end `CANCELLED`.
    pub cancelled: &'a [Uuid],
}

impl Accepted<'_> {
    fn len(&self) -> usize {
        self.completed.len() + self.cancelled.len()
    }
}

/// What happened to the orders of a case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Orders answered 201.
    pub accepted: usize,
    /// Of those that must end `COMPLETED`, the ones that did.
    pub completed: usize,
    /// Of those the case cancelled, the ones `CANCELLED` at the end.
    pub cancelled: usize,
    /// Accepted orders not in the database at all (a 201 for an order that did not commit).
    pub missing: usize,
    /// `processed_messages` rows of their `OrderCreated` events.
    pub processed: usize,
    /// `processed_messages` rows of the `OrderCancelled` events of the cancelled orders.
    pub cancels_processed: usize,
    /// Status changes out of `CANCELLED` (any order): cancellations undone.
    pub undone_cancels: usize,
    /// Orders (any, answered or not) processed or changed more than once.
    pub doubled_orders: usize,
    /// The extra processed rows and extra status changes of those orders: second effects.
    pub extra_effects: usize,
    /// Deliveries deduplicated in the consumer's transaction: copies that had no effect.
    pub redelivered: usize,
    /// Every order in the database, answered or not (a 201 lost on the wire still commits).
    pub orders_total: usize,
    /// Orders in the database still `PENDING`.
    pub pending_total: usize,
    /// Outbox rows left.
    pub outbox_left: usize,
    /// Outbox rows marked failed (refused by the broker too often).
    pub outbox_failed: usize,
}

impl Counts {
    /// Accepted orders not in the state they must end in (`COMPLETED`, or `CANCELLED` for the
    /// cancelled ones).
    pub fn lost(&self) -> usize {
        self.accepted.saturating_sub(self.completed + self.cancelled)
    }

    /// Deliveries with a second effect.
    pub fn duplicates(&self) -> usize {
        self.extra_effects
    }
}

/// How the drain went.
#[derive(Clone, Debug)]
pub struct Drain {
    /// The final counts.
    pub counts: Counts,
    /// True when everything completed and the outbox emptied before the deadline.
    pub drained: bool,
    /// From the call until drained (or the deadline).
    pub took: Duration,
}

/// Waits until every accepted order is in its final state, no order in the database is
/// `PENDING` and the outbox is empty, or `deadline` passes; then counts. Connection failures
/// are retried until the deadline.
pub fn wait_for_drain(db: &ChaosDb, accepted: Accepted, deadline: Duration) -> Result<Drain> {
    let started = Instant::now();
    let mut client: Option<Client> = None;
    let mut last_error = None;
    let drained = loop {
        let attempt = connected(db, &mut client).and_then(|c| is_drained(c, accepted));
        match attempt {
            Ok(true) => break true,
            Ok(false) => {}
            Err(e) => {
                client = None;
                last_error = Some(e);
            }
        }
        if started.elapsed() >= deadline {
            break false;
        }
        std::thread::sleep(POLL);
    };
    let took = started.elapsed();
    let counts = match connected(db, &mut client).and_then(|c| count(c, accepted)) {
        Ok(counts) => counts,
        Err(e) => {
            let before = last_error.map_or(String::new(), |e| format!(" (earlier: {e})"));
            return Err(Error::Other(format!("cannot count the orders: {e}{before}")));
        }
    };
    Ok(Drain {
        counts,
        drained,
        took,
    })
}

/// Rows in the outbox now.
pub fn outbox_rows(client: &mut Client) -> Result<usize> {
    let row = client
        .query_one(COUNT_OUTBOX, &[])
        .map_err(|e| Error::db("cannot count the outbox", e))?;
    Ok(as_count(row.get(0)))
}

fn connected<'c>(db: &ChaosDb, client: &'c mut Option<Client>) -> Result<&'c mut Client> {
    if client.as_ref().is_some_and(Client::is_closed) {
        *client = None;
    }
    match client {
        Some(client) => Ok(client),
        None => Ok(client.insert(db.client()?)),
    }
}

fn is_drained(client: &mut Client, accepted: Accepted) -> Result<bool> {
    let (completed, _) = count_in_status(client, accepted.completed, "COMPLETED")?;
    let (cancelled, _) = count_in_status(client, accepted.cancelled, "CANCELLED")?;
    if completed + cancelled < accepted.len() {
        return Ok(false);
    }
    let outbox = outbox_rows(client)?;
    let (_, pending) = two_counts(client, COUNT_ALL_ORDERS, &[])?;
    Ok(outbox == 0 && pending == 0)
}

/// Of `ids`, (those in `status`, those found).
fn count_in_status(client: &mut Client, ids: &[Uuid], status: &str) -> Result<(usize, usize)> {
    let (mut in_status, mut found) = (0, 0);
    for chunk in ids.chunks(CHUNK) {
        let (n, f) = two_counts(client, COUNT_ACCEPTED, &[&chunk, &status])?;
        in_status += n;
        found += f;
    }
    Ok((in_status, found))
}

/// `processed_messages` rows of the `event_type` events of the orders `ids`.
fn count_processed(client: &mut Client, ids: &[Uuid], event_type: &str) -> Result<usize> {
    let mut processed = 0;
    for chunk in ids.chunks(CHUNK) {
        let texts: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
        let row = client
            .query_one(COUNT_PROCESSED, &[&texts, &event_type])
            .map_err(|e| Error::db("cannot count processed_messages", e))?;
        processed += as_count(row.get(0));
    }
    Ok(processed)
}

fn count(client: &mut Client, accepted: Accepted) -> Result<Counts> {
    let (completed, found_completed) = count_in_status(client, accepted.completed, "COMPLETED")?;
    let (cancelled, found_cancelled) = count_in_status(client, accepted.cancelled, "CANCELLED")?;
    let processed = count_processed(client, accepted.completed, ORDER_CREATED)?
        + count_processed(client, accepted.cancelled, ORDER_CREATED)?;
    let cancels_processed = count_processed(client, accepted.cancelled, ORDER_CANCELLED)?;
    let (doubled_processed, extra_processed) = two_counts(client, DOUBLED_PROCESSED, &[])?;
    let (doubled_effects, extra_changes) = two_counts(client, DOUBLED_EFFECTS, &[])?;
    let single = |client: &mut Client, sql: &str| {
        client
            .query_one(sql, &[])
            .map(|row| as_count(row.get(0)))
            .map_err(|e| Error::db("cannot read the audit tables", e))
    };
    let redelivered = single(client, REDELIVERED)?;
    let undone_cancels = single(client, UNDONE_CANCELS)?;
    let (orders_total, pending_total) = two_counts(client, COUNT_ALL_ORDERS, &[])?;
    let (outbox_left, outbox_failed) = two_counts(client, COUNT_OUTBOX, &[])?;
    Ok(Counts {
        accepted: accepted.len(),
        completed,
        cancelled,
        missing: accepted.len().saturating_sub(found_completed + found_cancelled),
        processed,
        cancels_processed,
        undone_cancels,
        doubled_orders: doubled_processed.max(doubled_effects),
        extra_effects: extra_processed + extra_changes,
        redelivered,
        orders_total,
        pending_total,
        outbox_left,
        outbox_failed,
    })
}

fn two_counts(
    client: &mut Client,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Result<(usize, usize)> {
    let row = client
        .query_one(sql, params)
        .map_err(|e| Error::db("cannot count the orders", e))?;
    Ok((as_count(row.get(0)), as_count(row.get(1))))
}

fn as_count(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::Counts;

    #[test]
    fn lost_and_duplicates_come_from_the_counts() {
        let counts = Counts {
            accepted: 10,
            completed: 8,
            extra_effects: 1,
            ..Counts::default()
        };
        assert_eq!((counts.lost(), counts.duplicates()), (2, 1));
        let with_cancels = Counts {
            cancelled: 1,
            ..counts
        };
        assert_eq!(
            with_cancels.lost(),
            1,
            "a cancelled order in its final state is not lost"
        );
    }
}
