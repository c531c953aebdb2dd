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
