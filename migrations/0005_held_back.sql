-- txoutbox migration 5: rows the ordered relay has found behind an earlier event of their
-- aggregate.

-- With aggregate ordering only an aggregate's first row may be claimed. The relay marks the
-- rows it finds behind another of their aggregate `held` and skips them (through the partial
-- index below) until the row before them is published and deleted, when it clears the mark of
-- the next one. So one aggregate with a long queue does not fill the window of oldest rows the
-- claim looks at. Writers never set it. A constant default touches no row.
ALTER TABLE {schema}.outbox ADD COLUMN IF NOT EXISTS held boolean NOT NULL DEFAULT false;

-- The ordered claim's window: the oldest rows not held back and not failed (a failed row is the
-- first of its aggregate; however many there are, they must not fill the window).
CREATE INDEX IF NOT EXISTS outbox_unheld_idx ON {schema}.outbox (id) WHERE NOT held AND failed_at IS NULL;
