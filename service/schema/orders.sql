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
