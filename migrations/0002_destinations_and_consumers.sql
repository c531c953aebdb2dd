-- txoutbox migration 2: a destination per event, dedupe per consumer.

-- Where the relay publishes the row: NULL exchange = the relay's topology exchange, NULL
-- routing key = the event type. Several services with their own exchanges share one outbox.
ALTER TABLE {schema}.outbox ADD COLUMN IF NOT EXISTS exchange text;
ALTER TABLE {schema}.outbox ADD COLUMN IF NOT EXISTS routing_key text;

-- Processed ids are scoped by consumer name (default: the consumer's queue), so two consumers
-- of different queues on one database each apply every event once. Rows recorded before this
-- migration keep the name '' and count as processed for every consumer until retention
-- purges them (an upgrade never applies an old message a second time).
ALTER TABLE {schema}.processed_messages ADD COLUMN IF NOT EXISTS consumer text NOT NULL DEFAULT '';
ALTER TABLE {schema}.processed_messages DROP CONSTRAINT IF EXISTS processed_messages_pkey;
ALTER TABLE {schema}.processed_messages ADD CONSTRAINT processed_messages_pkey PRIMARY KEY (consumer, message_id);
