//! The order domain of the example service: validating input, creating an order together with
//! its `OrderCreated` event, cancelling it with an `OrderCancelled` event, reading it back, and
//! applying those events when they are consumed.

use std::fmt;

use postgres::{Row, ToStatement, Transaction};
use serde_json::{json, Value};
use uuid::Uuid;

use txoutbox::consumer::{Handler, HandlerError, Message};
use txoutbox::db::PooledClient;
use txoutbox::outbox::{self, NewEvent, Outbox};
use txoutbox::relay::Waker;
use txoutbox::trace::TraceContext;
use txoutbox::{Error, Result};

/// Aggregate type of order events.
pub const AGGREGATE_TYPE: &str = "order";

/// The service's own `orders` table (`CREATE TABLE IF NOT EXISTS`); the library's tables come
/// from its migrations (`txoutbox migrate`).
pub const TABLE: &str = include_str!("../schema/orders.sql");

/// Creates the `orders` table when it does not exist: the service owns it, so its binaries
/// apply it at start (the library's tables are only checked, never changed, at start).
pub fn install_table(db: &txoutbox::Database) -> Result<()> {
    db.get()?
        .batch_execute(TABLE)
        .map_err(|e| Error::db("cannot create the orders table", e))
}

/// Prepares a database for the service: creates it when missing, applies the library's
/// migrations and the `orders` table. What `txoutbox migrate --create-database` and the
/// harness run before starting the binaries.
pub fn prepare_database(url: &str) -> Result<()> {
    let config = txoutbox::db::parse_url(url, std::time::Duration::from_secs(60))?;
    txoutbox::db::ensure_database(&config, url)?;
    let mut client = txoutbox::db::connect_url(url, std::time::Duration::from_secs(60))?;
    txoutbox::migrate::run(&mut client, txoutbox::migrate::DEFAULT_SCHEMA)?;
    client
        .batch_execute(TABLE)
        .map_err(|e| Error::db("cannot create the orders table", e))
}

/// Event written with every new order.
pub const ORDER_CREATED: &str = "OrderCreated";
/// Event written when an order is cancelled.
pub const ORDER_CANCELLED: &str = "OrderCancelled";

/// Largest amount NUMERIC(12,2) holds, in cents: 9,999,999,999.99.
const MAX_AMOUNT_CENTS: i64 = 999_999_999_999;

const INSERT_ORDER: &str = "\
    INSERT INTO orders (id, user_id, amount)
    VALUES ($1, $2, $3::text::numeric)
    RETURNING id, user_id, amount::text, status,
              to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
              to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";

/// A new order's columns as [`SELECT_ORDER`] returns them, named, for the `RETURNING` of the
/// `created` query of [`create_sql`].
const CREATED_COLUMNS: &str = "\
    id, user_id, amount::text AS amount, status,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS created_at,
    to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS updated_at";

const SELECT_ORDER: &str = "\
    SELECT id, user_id, amount::text, status,
           to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
           to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
    FROM orders WHERE id = $1";

/// Cancels an order unless it is already cancelled; returns it as [`SELECT_ORDER`] does.
const CANCEL_ORDER: &str = "\
    UPDATE orders SET status = 'CANCELLED', updated_at = now()
    WHERE id = $1 AND status <> 'CANCELLED'
    RETURNING id, user_id, amount::text, status,
              to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
              to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";

/// The consumer's transitions, guarded: `PENDING -> COMPLETED` only, so that a cancellation
/// (written by `POST /orders/{id}/cancel` itself) is never overwritten by an `OrderCreated`
/// applied after it; and `* -> CANCELLED`.
const COMPLETE_ORDERS: &str = "\
    UPDATE orders SET status = 'COMPLETED', updated_at = now()
    WHERE id = ANY($1) AND status = 'PENDING'";
const CANCEL_ORDERS: &str = "\
    UPDATE orders SET status = 'CANCELLED', updated_at = now()
    WHERE id = ANY($1) AND status <> 'CANCELLED'";

/// An exact amount of money in cents (minor units).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Amount(i64);

impl Amount {
    /// The amount in cents.
    pub fn cents(self) -> i64 {
        self.0
    }

    /// Parses a plain decimal such as `100`, `100.5` or `100.50`: positive, at most two
    /// decimals, at most 9,999,999,999.99 (what NUMERIC(12,2) holds).
    pub fn parse(text: &str) -> Result<Amount, String> {
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || (text.contains('.') && !digits(fraction)) {
            return Err(format!(
                "amount must be a plain decimal such as \"100.00\", got {text:?}"
            ));
        }
        if fraction.len() > 2 {
            return Err(format!("amount must have at most 2 decimals, got {text:?}"));
        }
        let whole = whole.trim_start_matches('0');
        if whole.len() > 10 {
            return Err(format!("amount must be at most 9999999999.99, got {text:?}"));
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| "amount is too large".to_string())?
        };
        let fraction: i64 = format!("{fraction:0<2}")
            .parse()
            .map_err(|_| "amount is malformed".to_string())?;
        let cents = whole * 100 + fraction;
        if cents == 0 {
            return Err("amount must be greater than 0".into());
        }
        if cents > MAX_AMOUNT_CENTS {
            return Err(format!("amount must be at most 9999999999.99, got {text:?}"));
        }
        Ok(Amount(cents))
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

/// A validated request to create an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewOrder {
    /// Who places the order.
    pub user_id: Uuid,
    /// How much it costs.
    pub amount: Amount,
}

/// Why a request body is not a valid order; `field` names the offending field, if one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidInput {
    /// Explanation for the client.
    pub error: String,
    /// The JSON field at fault, if the problem is one field.
    pub field: Option<String>,
}

impl InvalidInput {
    fn field(field: &str, error: impl Into<String>) -> Self {
        InvalidInput {
            error: error.into(),
            field: Some(field.into()),
        }
    }
    fn body(error: impl Into<String>) -> Self {
        InvalidInput {
            error: error.into(),
            field: None,
        }
    }
}

/// Parses and validates a JSON body `{"user_id": "<uuid>", "amount": "100.00"}`; `amount` may
/// also be a JSON number. Unknown fields are refused so that typos do not pass silently.
pub fn parse_new_order(body: &[u8]) -> Result<NewOrder, InvalidInput> {
    let text = std::str::from_utf8(body).map_err(|_| InvalidInput::body("body is not UTF-8"))?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| InvalidInput::body(format!("body is not valid JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(InvalidInput::body(
            "body must be a JSON object with user_id and amount",
        ));
    };
    if let Some(unknown) = object.keys().find(|k| *k != "user_id" && *k != "amount") {
        return Err(InvalidInput::field(
            unknown,
            format!("unknown field {unknown:?}; expected user_id and amount"),
        ));
    }
    let user_id = match object.get("user_id") {
        None | Some(Value::Null) => return Err(InvalidInput::field("user_id", "user_id is required")),
        Some(Value::String(s)) => Uuid::parse_str(s)
            .map_err(|_| InvalidInput::field("user_id", format!("user_id must be a UUID, got {s:?}")))?,
        Some(_) => return Err(InvalidInput::field("user_id", "user_id must be a UUID string")),
    };
    let amount = match object.get("amount") {
        None | Some(Value::Null) => return Err(InvalidInput::field("amount", "amount is required")),
        // With serde_json's arbitrary_precision a number keeps its exact digits.
        Some(Value::Number(n)) => Amount::parse(&n.to_string()),
        Some(Value::String(s)) => Amount::parse(s),
        Some(_) => Err("amount must be a decimal string such as \"100.00\" or a number".into()),
    }
    .map_err(|e| InvalidInput::field("amount", e))?;
    Ok(NewOrder { user_id, amount })
}

/// An order as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    /// Order id (UUIDv7).
    pub id: Uuid,
    /// Who placed it.
    pub user_id: Uuid,
    /// Amount with two decimals, e.g. `100.00`.
    pub amount: String,
    /// `PENDING`, `COMPLETED` or `CANCELLED`.
    pub status: String,
    /// Creation time, RFC 3339 in UTC.
    pub created_at: String,
    /// Last change, RFC 3339 in UTC.
    pub updated_at: String,
}

impl Order {
    fn from_row(row: &Row) -> Order {
        Order::from_row_at(row, 0)
    }

    /// The order whose columns start at `first` (as [`SELECT_ORDER`] returns them).
    fn from_row_at(row: &Row, first: usize) -> Order {
        Order {
            id: row.get(first),
            user_id: row.get(first + 1),
            amount: row.get(first + 2),
            status: row.get(first + 3),
            created_at: row.get(first + 4),
            updated_at: row.get(first + 5),
        }
    }

    /// The order as the API returns it.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id.to_string(),
            "user_id": self.user_id.to_string(),
            "amount": self.amount,
            "status": self.status,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        })
    }
}

/// How [`create`] lets the relay know about the new event.
#[derive(Clone, Debug)]
pub enum Announce {
    /// Postgres NOTIFY at commit: reaches a relay in any process.
    Notify,
    /// Wake this in-process relay after the commit; no NOTIFY (whose commits Postgres
    /// serializes).
    Wake(Waker),
}

impl Announce {
    /// `outbox` as this announcement needs it: with the NOTIFY at commit, or without for an
    /// in-process wake.
    pub fn outbox(&self, outbox: &Outbox) -> Outbox {
        match self {
            Announce::Notify => outbox.clone(),
            Announce::Wake(_) => outbox.clone().without_notify(),
        }
    }
}

/// The statement [`create`] (or, with a `key`, [`create_idempotent`]) runs on `outbox`: one
/// data-modifying `WITH` that inserts the order (`$1` id, `$2` user, `$3` amount) and its
/// `OrderCreated` event (`$4` message id, `$5`/`$6` trace context), built from the inserted
/// row as [`created_event`] builds it, and returns the order as [`SELECT_ORDER`] does. It is its
/// own transaction: one round trip, no `BEGIN` and `COMMIT`. With a key (`$7` key, `$8`
/// fingerprint, `$9` window in hours) the order is inserted only if the key was recorded
/// ([`RECORD_KEY`]); when a live key exists the statement writes nothing and returns no row.
fn create_sql(outbox: &Outbox, keyed: bool) -> String {
    let event = outbox.insert_select_sql(&format!(
        "SELECT $4::uuid, '{AGGREGATE_TYPE}', c.id::text, '{ORDER_CREATED}',
                jsonb_build_object('order_id', c.id::text, 'user_id', c.user_id::text,
                                   'amount', c.amount, 'created_at', c.created_at),
                NULL, NULL, $5::text, $6::text
         FROM created c"
    ));
    let (key, rows) = match keyed {
        false => (String::new(), "VALUES ($1, $2, $3::text::numeric)"),
        true => (
            format!("key AS ({RECORD_KEY}),"),
            "SELECT $1, $2, $3::text::numeric FROM key",
        ),
    };
    format!(
        "WITH {key}
         created AS (INSERT INTO orders (id, user_id, amount) {rows} RETURNING {CREATED_COLUMNS}),
         event AS ({event})
         SELECT id, user_id, amount, status, created_at, updated_at FROM created"
    )
}

/// Runs the create statement (`keyed` or not) of `outbox` on `conn` with `params`: built once
/// per thread and outbox, prepared once per connection. Returns the new order, or `None` when
/// a keyed statement found the key live.
fn run_create(
    conn: &mut PooledClient,
    outbox: &Outbox,
    keyed: bool,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Result<Option<Order>> {
    /// Statements built so far on this thread, by outbox statement and keyed; a handful at most
    /// (one outbox per server), started over past a bound.
    type Built = Vec<((String, bool), std::rc::Rc<str>)>;
    thread_local! {
        static BUILT: std::cell::RefCell<Built> = const { std::cell::RefCell::new(Vec::new()) };
    }
    const MOST_BUILT: usize = 16;
    let identity = outbox.insert_sql(false);
    let sql = BUILT.with_borrow_mut(|built| {
        let found = built
            .iter()
            .find(|((insert, k), _)| *k == keyed && insert == identity);
        if let Some((_, sql)) = found {
            return sql.clone();
        }
        if built.len() >= MOST_BUILT {
            built.clear();
        }
        let sql: std::rc::Rc<str> = create_sql(outbox, keyed).into();
        built.push(((identity.to_string(), keyed), sql.clone()));
        sql
    });
    let statement = conn
        .prepared(&sql)
        .map_err(|e| Error::db("cannot prepare the order statement", e))?;
    let row = conn
        .query_opt(&statement, params)
        .map_err(|e| Error::db("cannot insert the order and its event", e))?;
    Ok(row.as_ref().map(Order::from_row))
}

/// Inserts the order and its `OrderCreated` event in one statement, its own transaction, and
/// announces the event to the relay. `outbox` is [`Announce::outbox`] of the database's; `trace`
/// is the request's trace context, which the event carries.
pub fn create(
    conn: &mut PooledClient,
    outbox: &Outbox,
    new: &NewOrder,
    trace: Option<&TraceContext>,
    announce: &Announce,
) -> Result<Order> {
    let (id, amount, message_id) = (Uuid::now_v7(), new.amount.to_string(), Uuid::now_v7());
    let (traceparent, tracestate) = trace_headers(trace);
    let params: [&(dyn postgres::types::ToSql + Sync); 6] =
        [&id, &new.user_id, &amount, &message_id, &traceparent, &tracestate];
    let order = run_create(conn, outbox, false, &params)?
        .ok_or_else(|| Error::Other("the order insert returned no row".into()))?;
    if let Announce::Wake(waker) = announce {
        waker.wake();
    }
    Ok(order)
}

/// The `traceparent` and `tracestate` an event of `trace` carries.
fn trace_headers(trace: Option<&TraceContext>) -> (Option<&str>, Option<&str>) {
    (
        trace.map(TraceContext::traceparent),
        trace.and_then(TraceContext::tracestate),
    )
}

/// `event` carrying `trace`, if any.
fn traced(event: NewEvent, trace: Option<&TraceContext>) -> NewEvent {
    match trace {
        Some(trace) => event.with_trace_context(trace.clone()),
        None => event,
    }
}

/// How long an `Idempotency-Key` is remembered.
pub const IDEMPOTENCY_WINDOW_HOURS: i32 = 24;

/// The order key `$1` was recorded for, with its fingerprint. Read only after the order's
/// statement found the key live, so whatever its age now: a key that passed the window a moment
/// later is still the answer.
const SELECT_KEY: &str = "\
    SELECT k.fingerprint, o.id, o.user_id, o.amount::text, o.status,
           to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
           to_char(o.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
    FROM idempotency_keys k JOIN orders o ON o.id = k.order_id
    WHERE k.key = $1";

/// Records key `$7` (fingerprint `$8`) for new order `$1`, taking over a key older than `$9`
/// hours; no row when a live key exists (then the keyed [`create_sql`] writes nothing, and the
/// key's order is returned instead). A concurrent request with the key waits here for the
/// first one's commit.
const RECORD_KEY: &str = "\
    INSERT INTO idempotency_keys (key, fingerprint, order_id) VALUES ($7, $8, $1)
    ON CONFLICT (key) DO UPDATE
        SET fingerprint = EXCLUDED.fingerprint, order_id = EXCLUDED.order_id, created_at = now()
        WHERE idempotency_keys.created_at <= now() - make_interval(hours => $9)
    RETURNING 1";

/// Deletes keys past the window, a batch at a time. The outer condition is checked again on a
/// key that a new request took over meanwhile (its `created_at` renewed), which the subquery's
/// result alone would delete, letting a retry of that request create a second order.
const PURGE_KEYS: &str = "\
    DELETE FROM idempotency_keys WHERE key IN (
        SELECT key FROM idempotency_keys
        WHERE created_at <= now() - make_interval(hours => $1) LIMIT 1000)
      AND created_at <= now() - make_interval(hours => $1)";

/// What `POST /orders` with an `Idempotency-Key` comes to.
#[derive(Debug)]
pub enum Creation {
    /// A new order.
    Created(Order),
    /// The key was used before with the same order: that order, nothing written.
    Replayed(Order),
    /// The key was used before with another order: nothing written.
    KeyReused,
}

/// The request's identity for its key: the fields that make the order.
fn fingerprint(new: &NewOrder) -> String {
    format!("{}|{}", new.user_id, new.amount.cents())
}

/// [`create`] at most once per `key` within [`IDEMPOTENCY_WINDOW_HOURS`]: a second request with
/// the key and the same order gets the first one's order back (also after a restart, and when
/// both arrive at once: the second waits on the first's key), another order gets
/// [`Creation::KeyReused`]. The event of a new order carries `trace`.
pub fn create_idempotent(
    conn: &mut PooledClient,
    outbox: &Outbox,
    new: &NewOrder,
    key: &str,
    trace: Option<&TraceContext>,
    announce: &Announce,
) -> Result<Creation> {
    let print = fingerprint(new);
    let window = IDEMPOTENCY_WINDOW_HOURS;
    let lookup = |conn: &mut PooledClient| -> Result<Option<Creation>> {
        let select = conn
            .prepared(SELECT_KEY)
            .map_err(|e| Error::db("cannot prepare the idempotency key query", e))?;
        let row = conn
            .query_opt(&select, &[&key])
            .map_err(|e| Error::db("cannot read the idempotency key", e))?;
        Ok(row.map(|row| {
            let stored: String = row.get(0);
            if stored == print {
                Creation::Replayed(Order::from_row_at(&row, 1))
            } else {
                Creation::KeyReused
            }
        }))
    };
    // No lookup first: the statement records the key or, when it is live, writes nothing, and
    // only then is the key read (a new order is one round trip, a replay two).
    let (id, amount, message_id) = (Uuid::now_v7(), new.amount.to_string(), Uuid::now_v7());
    let (traceparent, tracestate) = trace_headers(trace);
    let params: [&(dyn postgres::types::ToSql + Sync); 9] = [
        &id,
        &new.user_id,
        &amount,
        &message_id,
        &traceparent,
        &tracestate,
        &key,
        &print,
        &window,
    ];
    let Some(order) = run_create(conn, outbox, true, &params)? else {
        // The key is live (an earlier request, or one that committed first): nothing was
        // written, its order is the answer.
        // Only the purge, between the two statements, can have deleted it: the key had expired.
        return lookup(conn)?
            .ok_or_else(|| Error::Other("the idempotency key expired meanwhile; retry".into()));
    };
    if let Announce::Wake(waker) = announce {
        waker.wake();
    }
    Ok(Creation::Created(order))
}

/// Purges expired idempotency keys now and every 10 minutes, on a thread of its own that ends
/// with the process.
pub fn start_key_purge(db: txoutbox::Database) -> Result<()> {
    std::thread::Builder::new()
        .name("key-purge".into())
        .spawn(move || loop {
            match db
                .get()
                .and_then(|mut client| purge_idempotency_keys(&mut *client))
            {
                Ok(0) => {}
                Ok(purged) => log::info!("orders: purged {purged} expired idempotency keys"),
                Err(e) => {
                    log::warn!("orders: cannot purge expired idempotency keys (retried in 10 min): {e}")
                }
            }
            std::thread::sleep(std::time::Duration::from_secs(600));
        })
        .map(|_| ())
        .map_err(|e| Error::Other(format!("cannot start the key purge thread: {e}")))
}

/// Deletes the idempotency keys older than the window; returns how many.
pub fn purge_idempotency_keys(client: &mut impl postgres::GenericClient) -> Result<u64> {
    let mut total = 0;
    loop {
        let deleted = client
            .execute(PURGE_KEYS, &[&IDEMPOTENCY_WINDOW_HOURS])
            .map_err(|e| Error::db("cannot purge idempotency keys", e))?;
        total += deleted;
        if deleted < 1000 {
            return Ok(total);
        }
    }
}

/// Inserts the order and enqueues its `OrderCreated` event in `outbox` on the caller's
/// transaction.
pub fn insert(tx: &mut Transaction<'_>, outbox: &Outbox, new: &NewOrder) -> Result<Order> {
    let order = insert_order_row(tx, INSERT_ORDER, new)?;
    outbox.enqueue(tx, &created_event(&order))?;
    Ok(order)
}

fn insert_order_row<S>(tx: &mut Transaction<'_>, statement: &S, new: &NewOrder) -> Result<Order>
where
    S: ToStatement + ?Sized,
{
    let row = tx
        .query_one(
            statement,
            &[&Uuid::now_v7(), &new.user_id, &new.amount.to_string()],
        )
        .map_err(|e| Error::db("cannot insert the order", e))?;
    Ok(Order::from_row(&row))
}

/// The `OrderCreated` event of a new order.
fn created_event(order: &Order) -> NewEvent {
    let payload = json!({
        "order_id": order.id.to_string(),
        "user_id": order.user_id.to_string(),
        "amount": order.amount,
        "created_at": order.created_at,
    });
    NewEvent::new(AGGREGATE_TYPE, order.id.to_string(), ORDER_CREATED, payload)
}

/// What [`cancel`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cancellation {
    /// The order is now `CANCELLED` and its `OrderCancelled` event is in the outbox.
    Cancelled(Order),
    /// The order was cancelled before; nothing was written.
    AlreadyCancelled(Order),
    /// No order has this id; nothing was written.
    NotFound,
}

/// Cancels an order (`PENDING` or `COMPLETED`) and writes its `OrderCancelled` event in the same
/// transaction, commits, and announces the event to the relay.
///
/// The transaction first takes the order's aggregate lock (the one [`Outbox::enqueue_ordered`] takes), then the
/// row lock of its update, so concurrent cancels of one order are serialised (the second finds it
/// cancelled) and the event's outbox id comes after every earlier event of the order: with
/// [`RelayOrdering::Aggregate`](txoutbox::RelayOrdering::Aggregate) it is published after
/// the order's `OrderCreated`. The event carries `trace`, the request's trace context.
pub fn cancel(
    conn: &mut PooledClient,
    outbox: &Outbox,
    id: Uuid,
    trace: Option<&TraceContext>,
    announce: &Announce,
) -> Result<Cancellation> {
    let prepare = |e| Error::db("cannot prepare the order statements", e);
    let lock = conn.prepared(outbox::LOCK_AGGREGATE).map_err(prepare)?;
    let cancel_order = conn.prepared(CANCEL_ORDER).map_err(prepare)?;
    let select_order = conn.prepared(SELECT_ORDER).map_err(prepare)?;
    let insert_event = conn.prepared(outbox.insert_sql(false)).map_err(prepare)?;
    let mut tx = conn
        .transaction()
        .map_err(|e| Error::db("cannot begin the cancel transaction", e))?;
    let aggregate_id = id.to_string();
    tx.execute(&lock, &[&AGGREGATE_TYPE, &aggregate_id])
        .map_err(|e| Error::db("cannot lock the order's events", e))?;
    let cancelled = tx
        .query_opt(&cancel_order, &[&id])
        .map_err(|e| Error::db("cannot cancel the order", e))?;
    let Some(row) = cancelled else {
        // Nothing changed: the transaction rolls back when dropped.
        let existing = tx
            .query_opt(&select_order, &[&id])
            .map_err(|e| Error::db("cannot read the order", e))?;
        return Ok(match existing {
            Some(row) => Cancellation::AlreadyCancelled(Order::from_row(&row)),
            None => Cancellation::NotFound,
        });
    };
    let order = Order::from_row(&row);
    outbox::insert_event(&mut tx, &insert_event, &traced(cancelled_event(&order), trace))?;
    tx.commit()
        .map_err(|e| Error::db("cannot commit the cancellation", e))?;
    if let Announce::Wake(waker) = announce {
        waker.wake();
    }
    Ok(Cancellation::Cancelled(order))
}

/// The `OrderCancelled` event of an order just cancelled (its `updated_at` is the cancel time).
fn cancelled_event(order: &Order) -> NewEvent {
    let payload = json!({
        "order_id": order.id.to_string(),
        "user_id": order.user_id.to_string(),
        "amount": order.amount,
        "cancelled_at": order.updated_at,
    });
    NewEvent::new(AGGREGATE_TYPE, order.id.to_string(), ORDER_CANCELLED, payload)
}

/// The order with this id, if any.
pub fn get(conn: &mut PooledClient, id: Uuid) -> Result<Option<Order>> {
    let select = conn
        .prepared(SELECT_ORDER)
        .map_err(|e| Error::db("cannot prepare the order query", e))?;
    let row = conn
        .query_opt(&select, &[&id])
        .map_err(|e| Error::db("cannot read the order", e))?;
    Ok(row.as_ref().map(Order::from_row))
}

/// The consumer's effect for the order service: it keeps each order's status in step with the
/// order's events, applying each event's transition as it arrives: `OrderCreated` sets
/// `COMPLETED`, `OrderCancelled` sets `CANCELLED`. Other event types are acknowledged without
/// effect; a redelivered event has no second effect (the consumer dedupes it).
///
/// The transitions are guarded: `OrderCreated` completes only a `PENDING` order, so a cancelled
/// order stays `CANCELLED` whatever the order its events arrive in, and a second cancel finds it
/// cancelled (409, no second `OrderCancelled`).
#[derive(Clone, Copy, Debug, Default)]
pub struct OrderEvents;

impl OrderEvents {
    /// The status `message` leads its order to, with the order id; `None` for other events.
    fn transition(message: &Message) -> Result<Option<(Uuid, &'static str)>, HandlerError> {
        let (event_type, status) = match message.event_type.as_deref() {
            Some(ORDER_CREATED) => (ORDER_CREATED, "COMPLETED"),
            Some(ORDER_CANCELLED) => (ORDER_CANCELLED, "CANCELLED"),
            _ => return Ok(None),
        };
        message
            .payload
            .get("order_id")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
            .map(|id| Some((id, status)))
            .ok_or_else(|| HandlerError::permanent(format!("{event_type} payload has no valid order_id")))
    }
}

impl Handler for OrderEvents {
    fn handle(&mut self, tx: &mut Transaction<'_>, message: &Message) -> Result<(), HandlerError> {
        self.handle_batch(tx, &[message])
    }

    /// Applies the batch in two statements, as if the events were applied one by one with the
    /// guarded transitions: an order with a cancel in the batch ends `CANCELLED`, else an
    /// `OrderCreated` completes it if it is `PENDING`.
    fn handle_batch(&mut self, tx: &mut Transaction<'_>, messages: &[&Message]) -> Result<(), HandlerError> {
        let mut outcomes = std::collections::HashMap::with_capacity(messages.len());
        for message in messages {
            if let Some((id, status)) = Self::transition(message)? {
                // Nothing leaves CANCELLED: a cancel anywhere in the batch is the outcome.
                let outcome = outcomes.entry(id).or_insert(status);
                if *outcome != "CANCELLED" {
                    *outcome = status;
                }
            }
        }
        for status in ["COMPLETED", "CANCELLED"] {
            let ids: Vec<Uuid> = outcomes
                .iter()
                .filter(|(_, s)| **s == status)
                .map(|(id, _)| *id)
                .collect();
            if !ids.is_empty() {
                let statement = if status == "COMPLETED" {
                    COMPLETE_ORDERS
                } else {
                    CANCEL_ORDERS
                };
                let statement = txoutbox::consumer::prepared(tx, statement)?;
                tx.execute(&statement, &[&ids])?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_exactly() {
        assert_eq!(Amount::parse("100").map(|a| a.cents()), Ok(10_000));
        assert_eq!(Amount::parse("100.5").map(|a| a.cents()), Ok(10_050));
        assert_eq!(Amount::parse("0.01").map(|a| a.cents()), Ok(1));
        assert_eq!(
            Amount::parse("9999999999.99").map(|a| a.cents()),
            Ok(MAX_AMOUNT_CENTS)
        );
        assert_eq!(
            Amount::parse("000100.10").map(|a| a.to_string()),
            Ok("100.10".into())
        );
        for bad in [
            "",
            "0",
            "0.00",
            "-1",
            "1.234",
            "1e3",
            "10000000000",
            "1.",
            ".5",
            " 1",
            "NaN",
            "+1",
            "1_0",
        ] {
            assert!(Amount::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn order_bodies_are_validated_with_the_field_at_fault() {
        let user = "8c1a2c1e-56e4-4c1f-9d8e-9d3b7f0c2a11";
        let ok = format!(r#"{{"user_id":"{user}","amount":12.5}}"#);
        assert_eq!(parse_new_order(ok.as_bytes()).map(|o| o.amount.cents()), Ok(1250));
        let field = |body: String| parse_new_order(body.as_bytes()).err().and_then(|e| e.field);
        assert_eq!(
            field(format!(r#"{{"user_id":"{user}","amount":1e309}}"#)).as_deref(),
            Some("amount")
        );
        assert_eq!(
            field(format!(r#"{{"user_id":"{user}"}}"#)).as_deref(),
            Some("amount")
        );
        assert_eq!(
            field(r#"{"user_id":"x","amount":"1"}"#.into()).as_deref(),
            Some("user_id")
        );
        assert_eq!(
            field(format!(r#"{{"user_id":"{user}","amount":"1","x":1}}"#)).as_deref(),
            Some("x")
        );
        assert!(parse_new_order(b"[1]").is_err());
        assert!(parse_new_order(b"\xff").is_err());
    }
}
