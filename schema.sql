-- The example service's complete schema: the txoutbox library's migrations for schema public
-- (`txoutbox migrate --print`), then the service's own orders table (service/schema/orders.sql).
-- A test checks it equals both; `txoutbox migrate --create-database` applies the same.

-- txoutbox schema version 7, for schema public
BEGIN;
CREATE TABLE IF NOT EXISTS "public".txoutbox_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- migration 1: outbox
-- txoutbox migration 1: the outbox and the consumer's dedupe table.
-- `"public"` is the Postgres schema the library's tables live in (default public).

-- Events written in the same transaction as the change they describe. A row lives here until
-- the broker has confirmed it; the relay then deletes it.
CREATE TABLE IF NOT EXISTS "public".outbox (
    id              bigserial   PRIMARY KEY,           -- claim order (not commit order)
    message_id      uuid        NOT NULL UNIQUE,       -- AMQP message_id, the consumer's dedupe key
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,              -- AMQP type and routing key
    payload         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer     NOT NULL DEFAULT 0,    -- failed publish attempts so far
    last_error      text,                              -- why the last attempt failed
    available_at    timestamptz NOT NULL DEFAULT now(), -- not claimed before this time (backoff)
    failed_at       timestamptz                        -- set after max_attempts refusals: skipped
                                                       -- until re-queued (set back to NULL)
);

-- Databases created by an unversioned earlier schema gain the columns added since.
ALTER TABLE "public".outbox ADD COLUMN IF NOT EXISTS failed_at timestamptz;

-- The relay claims available rows in id order through the primary key; rows waiting for a
-- retry (available_at in the future) or failed are rare and filtered on the way.
CREATE INDEX IF NOT EXISTS outbox_failed_idx ON "public".outbox (id) WHERE failed_at IS NOT NULL;

-- With aggregate ordering the relay looks for an earlier event of the same aggregate before
-- claiming a row.
CREATE INDEX IF NOT EXISTS outbox_aggregate_idx ON "public".outbox (aggregate_type, aggregate_id, id);

-- One row per message whose effect has committed: the consumer's dedupe table.
CREATE TABLE IF NOT EXISTS "public".processed_messages (
    message_id    uuid        PRIMARY KEY,
    event_type    text,
    aggregate_id  text,
    processed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS processed_messages_aggregate_idx ON "public".processed_messages (aggregate_id);
CREATE INDEX IF NOT EXISTS processed_messages_processed_at_idx ON "public".processed_messages (processed_at);
INSERT INTO "public".txoutbox_migrations (version, name) VALUES (1, 'outbox') ON CONFLICT (version) DO NOTHING;

-- migration 2: destinations
-- txoutbox migration 2: a destination per event.

-- Where the relay publishes the row: NULL exchange = the relay's topology exchange, NULL
-- routing key = the event type. Several services with their own exchanges share one outbox.
-- Adding nullable columns without a default touches no row: the lock is brief.
ALTER TABLE "public".outbox ADD COLUMN IF NOT EXISTS exchange text;
ALTER TABLE "public".outbox ADD COLUMN IF NOT EXISTS routing_key text;
INSERT INTO "public".txoutbox_migrations (version, name) VALUES (2, 'destinations') ON CONFLICT (version) DO NOTHING;

-- migration 3: consumer_names
-- txoutbox migration 3: processed ids per consumer name.

-- Processed ids are scoped by consumer name (default: the consumer's queue), so two consumers
-- of different queues on one database each apply every event once. Rows recorded before this
-- migration keep the name '' and count as processed for every consumer until retention
-- purges them (an upgrade never applies an old message a second time).
ALTER TABLE "public".processed_messages ADD COLUMN IF NOT EXISTS consumer text NOT NULL DEFAULT '';

-- The new key rewrites the index under an exclusive lock on processed_messages (consumers of an
-- older txoutbox stop working from here: stop them first). Done only once, however often the
-- script is applied.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = '"public".processed_messages'::regclass
          AND contype = 'p' AND array_length(conkey, 1) = 2
    ) THEN
        ALTER TABLE "public".processed_messages DROP CONSTRAINT IF EXISTS processed_messages_pkey;
        ALTER TABLE "public".processed_messages
            ADD CONSTRAINT processed_messages_pkey PRIMARY KEY (consumer, message_id);
    END IF;
END $$;
INSERT INTO "public".txoutbox_migrations (version, name) VALUES (3, 'consumer_names') ON CONFLICT (version) DO NOTHING;

-- migration 4: aggregate_sequence
-- txoutbox migration 4: each processed event's place in its aggregate.

-- When the relay publishes in aggregate order, each message carries its aggregate type and a
-- sequence (its outbox id, which grows with each event of an aggregate). The consumer records
-- both, and refuses a message older than one of its aggregate it already applied (a dead letter
-- replayed after a later event, say). Nullable columns without a default touch no row.
ALTER TABLE "public".processed_messages ADD COLUMN IF NOT EXISTS aggregate_type text;
ALTER TABLE "public".processed_messages ADD COLUMN IF NOT EXISTS aggregate_sequence bigint;

-- The latest applied sequence of an aggregate, per consumer. Rows from before this migration
-- have no sequence and are not in the index, so building it reads the table once and writes
-- next to nothing (it blocks writes to processed_messages meanwhile).
CREATE INDEX IF NOT EXISTS processed_messages_sequence_idx
    ON "public".processed_messages (consumer, aggregate_type, aggregate_id, aggregate_sequence)
    WHERE aggregate_sequence IS NOT NULL;
INSERT INTO "public".txoutbox_migrations (version, name) VALUES (4, 'aggregate_sequence') ON CONFLICT (version) DO NOTHING;

-- migration 5: held_back
-- txoutbox migration 5: rows the ordered relay has found behind an earlier event of their
-- aggregate.

-- With aggregate ordering only an aggregate's first row may be claimed. The relay marks the
-- rows it finds behind another of their aggregate `held` and skips them (through the partial
-- index below) until the row before them is published and deleted, when it clears the mark of
-- the next one. So one aggregate with a long queue does not fill the window of oldest rows the
-- claim looks at. Writers never set it. A constant default touches no row.
ALTER TABLE "public".outbox ADD COLUMN IF NOT EXISTS held boolean NOT NULL DEFAULT false;

-- The ordered claim's window: the oldest rows not held back.
CREATE INDEX IF NOT EXISTS outbox_unheld_idx ON "public".outbox (id) WHERE NOT held;
INSERT INTO "public".txoutbox_migrations (version, name) VALUES (5, 'held_back') ON CONFLICT (version) DO NOTHING;

-- migration 6: trace_context
-- txoutbox migration 6: the W3C trace context of each event.

-- The `traceparent` and `tracestate` the event was written under (NewEvent::with_trace_context),
-- validated by the library before the insert; the relay sends them as AMQP headers of the same
-- names. NULL: the event has none. Nullable columns without a default touch no row: the lock is
-- brief.
ALTER TABLE "public".outbox ADD COLUMN IF NOT EXISTS traceparent text;
ALTER TABLE "public".outbox ADD COLUMN IF NOT EXISTS tracestate text;
INSERT INTO "public".txoutbox_migrations (version, name) VALUES (6, 'trace_context') ON CONFLICT (version) DO NOTHING;

-- migration 7: scheduled
-- txoutbox migration 7: events scheduled for later.

-- An event written with a not-before time waits here, not in the outbox, so that however many
-- wait and for however long, the relay's claims never look at them. Each relay moves the events
-- that have come due into the outbox (in not-before order, under their aggregates' locks, as
-- `enqueue_many_ordered` writes), where they are published like any other: an event joins its
-- aggregate's order when it comes due, and holds back none of the aggregate's other events.
CREATE TABLE IF NOT EXISTS "public".outbox_scheduled (
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
CREATE INDEX IF NOT EXISTS outbox_scheduled_due_idx ON "public".outbox_scheduled (not_before, id);
INSERT INTO "public".txoutbox_migrations (version, name) VALUES (7, 'scheduled') ON CONFLICT (version) DO NOTHING;
COMMIT;

-- The order domain of the example service: its own table, beside the library's.
CREATE TABLE IF NOT EXISTS orders (
    id          uuid          PRIMARY KEY,
    user_id     uuid          NOT NULL,
    amount      numeric(12,2) NOT NULL CHECK (amount > 0),
    status      text          NOT NULL DEFAULT 'PENDING'
                              CHECK (status IN ('PENDING', 'COMPLETED', 'CANCELLED')),
    created_at  timestamptz   NOT NULL DEFAULT now(),
    updated_at  timestamptz   NOT NULL DEFAULT now()
);

-- `Idempotency-Key`s of POST /orders: a retried request with the same key and body gets the
-- order the first one created. Kept 24 hours (the server purges older ones).
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key          text        PRIMARY KEY,
    fingerprint  text        NOT NULL,              -- the request's user id and amount
    order_id     uuid        NOT NULL REFERENCES orders (id),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created_at_idx ON idempotency_keys (created_at);
