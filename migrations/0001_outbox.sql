-- txoutbox migration 1: the outbox and the consumer's dedupe table.
-- `{schema}` is the Postgres schema the library's tables live in (default public).

-- Events written in the same transaction as the change they describe. A row lives here until
-- the broker has confirmed it; the relay then deletes it.
CREATE TABLE IF NOT EXISTS {schema}.outbox (
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
ALTER TABLE {schema}.outbox ADD COLUMN IF NOT EXISTS failed_at timestamptz;

-- The relay claims available rows in id order through the primary key; rows waiting for a
-- retry (available_at in the future) or failed are rare and filtered on the way.
CREATE INDEX IF NOT EXISTS outbox_failed_idx ON {schema}.outbox (id) WHERE failed_at IS NOT NULL;

-- With aggregate ordering the relay looks for an earlier event of the same aggregate before
-- claiming a row.
CREATE INDEX IF NOT EXISTS outbox_aggregate_idx ON {schema}.outbox (aggregate_type, aggregate_id, id);

-- One row per message whose effect has committed: the consumer's dedupe table.
CREATE TABLE IF NOT EXISTS {schema}.processed_messages (
    message_id    uuid        PRIMARY KEY,
    event_type    text,
    aggregate_id  text,
    processed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS processed_messages_aggregate_idx ON {schema}.processed_messages (aggregate_id);
CREATE INDEX IF NOT EXISTS processed_messages_processed_at_idx ON {schema}.processed_messages (processed_at);
