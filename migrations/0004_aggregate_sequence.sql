-- txoutbox migration 4: each processed event's place in its aggregate.

-- When the relay publishes in aggregate order, each message carries its aggregate type and a
-- sequence (its outbox id, which grows with each event of an aggregate). The consumer records
-- both, and refuses a message older than one of its aggregate it already applied (a dead letter
-- replayed after a later event, say). Nullable columns without a default touch no row.
ALTER TABLE {schema}.processed_messages ADD COLUMN IF NOT EXISTS aggregate_type text;
ALTER TABLE {schema}.processed_messages ADD COLUMN IF NOT EXISTS aggregate_sequence bigint;

-- The latest applied sequence of an aggregate, per consumer. Rows from before this migration
-- have no sequence and are not in the index, so building it reads the table once and writes
-- next to nothing (it blocks writes to processed_messages meanwhile).
CREATE INDEX IF NOT EXISTS processed_messages_sequence_idx
    ON {schema}.processed_messages (consumer, aggregate_type, aggregate_id, aggregate_sequence)
    WHERE aggregate_sequence IS NOT NULL;
