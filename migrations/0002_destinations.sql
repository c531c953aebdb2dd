-- txoutbox migration 2: a destination per event.

-- Where the relay publishes the row: NULL exchange = the relay's topology exchange, NULL
-- routing key = the event type. Several services with their own exchanges share one outbox.
-- Adding nullable columns without a default touches no row: the lock is brief.
ALTER TABLE {schema}.outbox ADD COLUMN IF NOT EXISTS exchange text;
ALTER TABLE {schema}.outbox ADD COLUMN IF NOT EXISTS routing_key text;
