-- txoutbox migration 7: events scheduled for later.

-- An event written with a not-before time waits here, not in the outbox, so that however many
-- wait and for however long, the relay's claims never look at them. Each relay moves the events
-- that have come due into the outbox (in not-before order, under their aggregates' locks, as
-- `enqueue_many_ordered` writes), where they are published like any other: an event joins its
-- aggregate's order when it comes due, and holds back none of the aggregate's other events.
CREATE TABLE IF NOT EXISTS {schema}.outbox_scheduled (
    id              bigserial   PRIMARY KEY,
    not_before      timestamptz NOT NULL,              -- not moved to the outbox before this time
    message_id      uuid        NOT NULL UNIQUE,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,
    payload         jsonb       NOT NULL,
    exchange        text,
    routing_key     text,
    traceparent     text,
    tracestate      text,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- What is due next, for the relay's move and its wait until then.
CREATE INDEX IF NOT EXISTS outbox_scheduled_due_idx ON {schema}.outbox_scheduled (not_before, id);
