//! Operator tasks behind the `txoutbox` admin CLI: status, re-queueing, dead-letter replay and
//! retention of the dedupe table.

use std::time::Duration;

use amiquip::Publish;
use postgres::GenericClient;

use crate::broker::{self, Topology};
use crate::schema::Schema;
use crate::{Error, Result};

/// What an operator looks at first.
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    /// Events waiting in the outbox (not failed).
    pub backlog: i64,
    /// Age in seconds of the oldest waiting event (0 when none).
    pub oldest_age_secs: f64,
    /// Events marked failed, waiting for an operator.
    pub failed: i64,
    /// Events scheduled for later ([`NewEvent::not_before`](crate::NewEvent::not_before)), not
    /// yet in the outbox.
    pub scheduled: i64,
    /// Seconds until the first scheduled event is due (negative when overdue), if any.
    pub next_due_secs: Option<f64>,
    /// Messages ready in the main queue, when the broker answered.
    pub queue_depth: Option<u32>,
    /// Messages in the dead-letter queue, when the broker answered.
    pub dlq_depth: Option<u32>,
}

/// Backlog (not failed), age in seconds of its oldest row, failed rows: one pass over `outbox`;
/// and the scheduled events (a count of `outbox_scheduled`) and when the first is due.
const OUTBOX_STATUS: &str = "\
    SELECT count(*) FILTER (WHERE failed_at IS NULL),
           coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE failed_at IS NULL)), 0)::float8,
           count(*) FILTER (WHERE failed_at IS NOT NULL),
           (SELECT count(*) FROM {schema}.outbox_scheduled),
           (SELECT extract(epoch FROM min(not_before) - now())::float8 FROM {schema}.outbox_scheduled)
    FROM {schema}.outbox";

/// What the outbox holds, from one pass over it.
pub struct OutboxSummary {
    /// Rows not marked failed: waiting, being published, or waiting for a retry.
    pub backlog: i64,
    /// Age in seconds of the oldest of those (0 when there is none).
    pub oldest_age_secs: f64,
    /// Rows marked failed.
    pub failed: i64,
    /// Events in `outbox_scheduled`, waiting for their not-before time.
    pub scheduled: i64,
    /// Seconds until the first of those is due (negative when overdue), if any.
    pub next_due_secs: Option<f64>,
}

/// Reads the [`OutboxSummary`] (one sequential pass over the outbox, which the relay keeps
/// small, and a count of `outbox_scheduled`).
pub fn outbox_summary(client: &mut impl GenericClient, schema: &Schema) -> Result<OutboxSummary> {
    let row = client
        .query_one(schema.qualify(OUTBOX_STATUS).as_str(), &[])
        .map_err(|e| Error::db("cannot read the outbox status", e))?;
    Ok(OutboxSummary {
        backlog: row.get(0),
        oldest_age_secs: row.get(1),
        failed: row.get(2),
        scheduled: row.get(3),
        next_due_secs: row.get(4),
    })
}

/// Reads the outbox figures from Postgres and the queue depths from RabbitMQ (left `None`
/// when the broker cannot be reached, so status still works during a broker outage).
pub fn status(
    client: &mut impl GenericClient,
    schema: &Schema,
    amqp_url: &str,
    topology: &Topology,
) -> Result<Status> {
    let outbox = outbox_summary(client, schema)?;
    let depths = queue_depths(amqp_url, topology);
    if let Err(e) = &depths {
        log::warn!("admin: queue depths unavailable: {e}");
    }
    let (queue_depth, dlq_depth) = depths.unwrap_or((None, None));
    Ok(Status {
        backlog: outbox.backlog,
        oldest_age_secs: outbox.oldest_age_secs,
        failed: outbox.failed,
        scheduled: outbox.scheduled,
        next_due_secs: outbox.next_due_secs,
        queue_depth,
        dlq_depth,
    })
}

fn queue_depths(amqp_url: &str, topology: &Topology) -> Result<(Option<u32>, Option<u32>)> {
    let (connection, channel) = broker::connect(amqp_url)?;
    topology.declare(&channel)?;
    let depth = |queue: String| {
        channel
            .queue_declare_passive(queue)
            .ok()
            .and_then(|q| q.declared_message_count())
    };
    let result = (depth(topology.queue.clone()), depth(topology.dead_letter_queue()));
    let _ = channel.close();
    let _ = connection.close();
    Ok(result)
}

/// Messages waiting in `topology`'s dead-letter queue (a passive declare: nothing is created).
pub fn dead_letter_depth(amqp_url: &str, topology: &Topology) -> Result<u32> {
    let (connection, channel) = broker::connect(amqp_url)?;
    let depth = channel
        .queue_declare_passive(topology.dead_letter_queue())
        .map_err(|e| Error::broker("cannot read the dead-letter queue's depth", e))
        .map(|queue| queue.declared_message_count().unwrap_or(0));
    let _ = channel.close();
    let _ = connection.close();
    depth
}

/// Moves the messages in the dead-letter queue back onto the main queue, once each: only as
/// many as were there when it started, each confirmed by the broker before its dead-letter copy
/// is removed. Returns how many were moved.
pub fn replay_dead_letters(amqp_url: &str, topology: &Topology) -> Result<u32> {
    replay_dead_letters_at_most(amqp_url, topology, u32::MAX)
}

/// [`replay_dead_letters`], moving at most `limit` messages: for callers that must answer in
/// bounded time (an HTTP request), and call again while more wait.
pub fn replay_dead_letters_at_most(amqp_url: &str, topology: &Topology, limit: u32) -> Result<u32> {
    let (connection, channel) = broker::connect(amqp_url)?;
    topology.declare(&channel)?;
    let dlq = topology.dead_letter_queue();
    let waiting = channel
        .queue_declare_passive(dlq.as_str())
        .map_err(|e| Error::broker("cannot read the dead-letter queue", e))?
        .declared_message_count()
        .unwrap_or(0)
        .min(limit);
    let confirms = broker::enable_confirms(&channel)?;
    let mut moved = 0;
    while moved < waiting {
        let Some(got) = channel
            .basic_get(dlq.as_str(), false)
            .map_err(|e| Error::broker("cannot read the dead-letter queue", e))?
        else {
            break;
        };
        let delivery = got.delivery;
        let mut properties = delivery.properties.clone();
        if let Some(headers) = properties.headers().clone() {
            let kept = headers
                .into_iter()
                .filter(|(k, _)| !k.starts_with("x-txoutbox-") && k != "x-death");
            properties = properties.with_headers(kept.collect());
        }
        // Straight to the main queue through the default exchange: no other binding sees it twice.
        channel
            .basic_publish(
                "",
                Publish::with_properties(&delivery.body, topology.queue.as_str(), properties),
            )
            .map_err(|e| Error::broker("cannot republish a dead letter", e))?;
        broker::wait_for_confirm(&confirms, u64::from(moved) + 1, Duration::from_secs(10))
            .map_err(|e| Error::Other(format!("replay stopped after {moved} moved: {e}")))?;
        delivery
            .ack(&channel)
            .map_err(|e| Error::broker("cannot remove a replayed dead letter", e))?;
        moved += 1;
    }
    let _ = channel.close();
    let _ = connection.close();
    Ok(moved)
}

const PURGE_PROCESSED_BATCH: &str = "\
    DELETE FROM {schema}.processed_messages
    WHERE (consumer, message_id) IN (
        SELECT consumer, message_id FROM {schema}.processed_messages
        WHERE processed_at < now() - make_interval(secs => $1)
        LIMIT $2
        FOR UPDATE SKIP LOCKED)";

/// Deletes dedupe rows older than `older_than`, `batch` rows per transaction so that no lock is
/// held long. Only safe once no copy of those messages can arrive again. Returns rows deleted.
pub fn purge_processed(
    client: &mut impl GenericClient,
    schema: &Schema,
    older_than: Duration,
    batch: i64,
) -> Result<u64> {
    // Prepared once for all the batches: its text per batch cost a round trip (and a plan)
    // more each time, and a third to close it.
    let purge = client
        .prepare(&schema.qualify(PURGE_PROCESSED_BATCH))
        .map_err(|e| Error::db("cannot prepare the purge of processed messages", e))?;
    let mut total = 0;
    loop {
        let deleted = client
            .execute(&purge, &[&older_than.as_secs_f64(), &batch])
            .map_err(|e| Error::db("cannot purge processed messages", e))?;
        total += deleted;
        if deleted < batch as u64 {
            return Ok(total);
        }
    }
}

/// Parses a retention such as `7d`, `12h`, `30m` or `45s`.
pub fn parse_age(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| Error::Config(format!("{text:?} is not an age such as 7d, 12h, 30m or 45s")))?;
    let seconds = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" | "" => 1,
        _ => return Err(Error::Config(format!("{text:?}: the unit must be d, h, m or s"))),
    };
    Ok(Duration::from_secs(number * seconds))
}

#[cfg(test)]
mod tests {
    use super::parse_age;
    use std::time::Duration;

    #[test]
    fn ages_parse() {
        assert_eq!(parse_age("7d").ok(), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_age("12h").ok(), Some(Duration::from_secs(12 * 3_600)));
        assert_eq!(parse_age("90").ok(), Some(Duration::from_secs(90)));
        assert!(parse_age("7 days").is_err());
        assert!(parse_age("d").is_err());
    }
}
