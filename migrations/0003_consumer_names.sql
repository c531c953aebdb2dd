-- txoutbox migration 3: processed ids per consumer name.

-- Processed ids are scoped by consumer name (default: the consumer's queue), so two consumers
-- of different queues on one database each apply every event once. Rows recorded before this
-- migration keep the name '' and count as processed for every consumer until retention
-- purges them (an upgrade never applies an old message a second time).
ALTER TABLE {schema}.processed_messages ADD COLUMN IF NOT EXISTS consumer text NOT NULL DEFAULT '';

-- The new key rewrites the index under an exclusive lock on processed_messages (consumers of an
-- older txoutbox stop working from here: stop them first). Done only once, however often the
-- script is applied.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = '{schema}.processed_messages'::regclass
          AND contype = 'p' AND array_length(conkey, 1) = 2
    ) THEN
        ALTER TABLE {schema}.processed_messages DROP CONSTRAINT IF EXISTS processed_messages_pkey;
        ALTER TABLE {schema}.processed_messages
            ADD CONSTRAINT processed_messages_pkey PRIMARY KEY (consumer, message_id);
    END IF;
END $$;
