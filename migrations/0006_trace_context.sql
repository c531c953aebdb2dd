-- txoutbox migration 6: the W3C trace context of each event.

-- The `traceparent` and `tracestate` the event was written under (NewEvent::with_trace_context),
-- validated by the library before the insert; the relay sends them as AMQP headers of the same
-- names. NULL: the event has none. Nullable columns without a default touch no row: the lock is
-- brief.
ALTER TABLE {schema}.outbox ADD COLUMN IF NOT EXISTS traceparent text;
ALTER TABLE {schema}.outbox ADD COLUMN IF NOT EXISTS tracestate text;
