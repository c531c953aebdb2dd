//! Statements and round trips per order in (3), counted by Postgres rather than estimated:
//! `pg_stat_statements` of the scenario's database, reset before the HTTP window and read once
//! every order of it is `COMPLETED`, split into the HTTP transaction, the relay and the consumer;
//! and the requests each process sent on its Postgres connections (TCP data segments, from the
//! kernel through `ss`), which also count what `pg_stat_statements` does not see (a `Parse`
//! round trip of an unprepared statement, a connection check).
//!
//! The server and the consumer log in as roles of their own (`txo_bench_<run>_server`,
//! `_consumer`, members of the bench's role so that they may do what it does), so that
//! Postgres tells their statements apart from each other and from the bench's own counting.
//! Within the server, a statement belongs to the relay when it reads or changes the outbox
//! without inserting into it (or is one of the relay's session statements: `LISTEN`, `SET`),
//! and to the HTTP transaction otherwise; `BEGIN` and `COMMIT` are split, one of each per order
//! insert going to the HTTP transaction and the rest to the relay, and a `ROLLBACK` is the
//! relay's (every order transaction of the window committed: (3) checks that every POST was
//! answered 201).
//!
//! `pg_stat_statements` needs `shared_preload_libraries`, which takes a restart of Postgres:
//! when it is not loaded the bench says so and what to run (`make pg-stat-statements`), and
//! reports the rest of the run as usual.

use crate::report::shorten;
use std::collections::BTreeMap;
use std::process::Command;

use postgres::Client;
use txoutbox::db::quote_identifier;
use txoutbox::{Error, Result};

use crate::infra::{FreshDb, Infra};

/// How to enable the extension when it is missing.
pub const ENABLE_HINT: &str = "make pg-stat-statements (ALTER SYSTEM SET shared_preload_libraries = \
     'pg_stat_statements', then a restart of Postgres: pg_ctlcluster 15 main restart)";

/// Statements shown per component in the console and in summary.md (results.json has all).
pub const TOP: usize = 6;

const PRELOADED: &str = "SHOW shared_preload_libraries";

const RESET: &str = "\
    SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database WHERE datname = current_database()), 0)";

const DEALLOCATIONS: &str = "SELECT dealloc FROM pg_stat_statements_info";

const READ: &str = "\
    SELECT r.rolname::text, s.query, s.calls, s.rows, s.total_exec_time
    FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
    WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND s.toplevel";

/// Whose statement it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    /// `POST /orders`: the order transaction in the server.
    Http,
    /// The relay inside the server.
    Relay,
    /// `txoutbox-consumer`.
    Consumer,
}

impl Component {
    /// The components, in report order.
    pub const ALL: [Component; 3] = [Component::Http, Component::Relay, Component::Consumer];

    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            Component::Http => "HTTP transaction",
            Component::Relay => "relay per event",
            Component::Consumer => "consumer per event",
        }
    }

    /// Stable key for results.json.
    pub fn key(self) -> &'static str {
        match self {
            Component::Http => "http",
            Component::Relay => "relay",
            Component::Consumer => "consumer",
        }
    }
}

/// One normalised statement of one component, over the window.
#[derive(Clone, Debug, PartialEq)]
pub struct Statement {
    /// Whose.
    pub component: Component,
    /// The text as `pg_stat_statements` normalised it, whitespace collapsed.
    pub query: String,
    /// Executions.
    pub calls: u64,
    /// Rows returned or changed.
    pub rows: u64,
    /// Time spent executing it, all calls, in milliseconds.
    pub exec_ms: f64,
}

/// What was counted over the window of (3).
#[derive(Clone, Debug, Default)]
pub struct Counted {
    /// Orders of the window (each one event, published once and consumed once).
    pub orders: u64,
    /// Every statement, by component, most expensive first.
    pub statements: Vec<Statement>,
    /// Requests sent to Postgres per process (`server`, `consumer`), when `ss` could count them.
    pub round_trips: Vec<(&'static str, u64)>,
    /// Why the round trips are not there, or what to doubt.
    pub notes: Vec<String>,
}

/// Totals of one component per order.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PerOrder {
    /// Statements executed.
    pub calls: f64,
    /// Rows returned or changed.
    pub rows: f64,
    /// Execution time, microseconds.
    pub exec_us: f64,
}

impl Counted {
    /// `component`'s statements, most expensive first.
    pub fn of(&self, component: Component) -> impl Iterator<Item = &Statement> {
        self.statements.iter().filter(move |s| s.component == component)
    }

    /// `component`'s totals divided by the orders.
    pub fn per_order(&self, component: Component) -> PerOrder {
        let n = self.orders.max(1) as f64;
        let mut total = PerOrder::default();
        for s in self.of(component) {
            total.calls += s.calls as f64 / n;
            total.rows += s.rows as f64 / n;
            total.exec_us += s.exec_ms * 1000.0 / n;
        }
        total
    }
}

/// The statement counts of (3), or why there are none.
#[derive(Clone, Debug)]
pub enum Statements {
    /// Counted.
    Counted(Counted),
    /// Not counted, and why (with what to run).
    Unavailable(String),
}

impl Statements {
    /// The console's lines (statements shortened to `width` characters).
    pub fn console(&self, width: usize) -> Vec<String> {
        let counted = match self {
            Statements::Unavailable(reason) => return vec![format!("  not counted: {reason}")],
            Statements::Counted(c) => c,
        };
        let mut lines = Vec::new();
        for component in Component::ALL {
            let total = counted.per_order(component);
            lines.push(format!(
                "  {:<20} {:>6.2} statements {:>6.2} rows {:>8.1} µs executing",
                component.label(),
                total.calls,
                total.rows,
                total.exec_us
            ));
            let n = counted.orders.max(1) as f64;
            for s in counted.of(component).take(TOP) {
                lines.push(format!(
                    "      {:>6.2} calls {:>6.2} rows {:>8.1} µs  {}",
                    s.calls as f64 / n,
                    s.rows as f64 / n,
                    s.exec_ms * 1000.0 / n,
                    shorten(&s.query, width)
                ));
            }
        }
        if !counted.round_trips.is_empty() {
            lines.push(format!(
                "  round trips per order: {}",
                counted.round_trips_brief()
            ));
        }
        for note in &counted.notes {
            lines.push(format!("  note: {note}"));
        }
        lines
    }

    /// summary.md's section.
    pub fn markdown(&self) -> String {
        let counted = match self {
            Statements::Unavailable(reason) => return format!("Not counted: {reason}.\n"),
            Statements::Counted(c) => c,
        };
        let n = counted.orders.max(1) as f64;
        let mut out = format!(
            "Counted by Postgres (`pg_stat_statements` of the scenario's database, reset before (3) and read once its {} orders were COMPLETED), per order; top {TOP} statements of each by execution time.\n\n\
             | Component | Statement | calls | rows | exec µs |\n|---|---|---:|---:|---:|\n",
            crate::report::count(counted.orders as f64)
        );
        for component in Component::ALL {
            let total = counted.per_order(component);
            out += &format!(
                "| **{}** | all | **{:.2}** | {:.2} | **{:.1}** |\n",
                component.label(),
                total.calls,
                total.rows,
                total.exec_us
            );
            for s in counted.of(component).take(TOP) {
                out += &format!(
                    "| | `{}` | {:.2} | {:.2} | {:.1} |\n",
                    shorten(&s.query, 120).replace('|', "\\|"),
                    s.calls as f64 / n,
                    s.rows as f64 / n,
                    s.exec_ms * 1000.0 / n
                );
            }
        }
        if !counted.round_trips.is_empty() {
            out += &format!(
                "\nRound trips per order (requests sent on each process's Postgres connections, TCP data segments): {}.\n",
                counted.round_trips_brief()
            );
        }
        for note in &counted.notes {
            out += &format!("\nNote: {note}.\n");
        }
        out
    }

    /// results.json's object.
    pub fn json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Statements::Unavailable(reason) => json!({ "counted": false, "reason": reason }),
            Statements::Counted(c) => {
                let n = c.orders.max(1) as f64;
                let mut per_component = serde_json::Map::new();
                for component in Component::ALL {
                    let t = c.per_order(component);
                    per_component.insert(
                        component.key().into(),
                        json!({ "statements": t.calls, "rows": t.rows, "exec_us": t.exec_us }),
                    );
                }
                let mut round_trips = serde_json::Map::new();
                for (name, sent) in &c.round_trips {
                    round_trips.insert(name.to_string(), json!(*sent as f64 / n));
                }
                json!({
                    "counted": true,
                    "orders": c.orders,
                    "per_order": per_component,
                    "round_trips_per_order": round_trips,
                    "notes": c.notes,
                    "statements": c.statements.iter().map(|s| json!({
                        "component": s.component.key(),
                        "query": s.query,
                        "calls": s.calls,
                        "rows": s.rows,
                        "exec_ms": s.exec_ms,
                        "calls_per_order": s.calls as f64 / n,
                        "exec_us_per_order": s.exec_ms * 1000.0 / n,
                    })).collect::<Vec<_>>(),
                })
            }
        }
    }
}

impl Counted {
    /// `server 5.10 (HTTP and relay), consumer 0.06` against the statements counted.
    fn round_trips_brief(&self) -> String {
        let n = self.orders.max(1) as f64;
        let statements = |name: &str| match name {
            "server" => self.per_order(Component::Http).calls + self.per_order(Component::Relay).calls,
            _ => self.per_order(Component::Consumer).calls,
        };
        self.round_trips
            .iter()
            .map(|(name, sent)| {
                format!(
                    "{name} {:.2} (for {:.2} statements)",
                    *sent as f64 / n,
                    statements(name)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Roles for the server and the consumer, dropped with this value.
pub struct Roles {
    /// The server's role.
    pub server: String,
    /// The consumer's role.
    pub consumer: String,
    admin: Client,
}

impl Drop for Roles {
    fn drop(&mut self) {
        for role in [&self.server, &self.consumer] {
            if let Err(e) = self
                .admin
                .batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_identifier(role)))
            {
                log::warn!("bench: cannot drop role {role}: {e:?}; drop it by hand");
            }
        }
    }
}

/// Counting set up on a scenario's database: the extension there, the two roles, and the
/// bench's own connection to reset and read it.
pub struct Counter {
    /// The roles the server and the consumer log in as.
    pub roles: Roles,
    client: Client,
    port: u16,
    deallocations: i64,
}

impl Counter {
    /// Sets up counting on `fresh`, or says why it cannot (the extension not loaded, roles
    /// refused); the scenario then runs without it.
    pub fn prepare(infra: &Infra, fresh: &FreshDb) -> std::result::Result<Counter, String> {
        let mut client = fresh.client().map_err(|e| e.to_string())?;
        let preloaded: String = client
            .query_one(PRELOADED, &[])
            .map(|row| row.get(0))
            .map_err(|e| format!("cannot read shared_preload_libraries: {e}"))?;
        if !preloaded.split(',').any(|l| l.trim() == "pg_stat_statements") {
            return Err(format!(
                "pg_stat_statements is not in shared_preload_libraries ({:?}); to count statements run {ENABLE_HINT}",
                preloaded
            ));
        }
        client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .map_err(|e| format!("cannot create extension pg_stat_statements: {e}"))?;
        let mut admin = infra.admin().map_err(|e| e.to_string())?;
        let me: String = admin
            .query_one("SELECT current_user::text", &[])
            .map(|row| row.get(0))
            .map_err(|e| format!("cannot read the bench's role: {e}"))?;
        let suffix = infra.run_suffix("pgss");
        let server = format!("{}{suffix}_server", crate::infra::DB_PREFIX);
        let consumer = format!("{}{suffix}_consumer", crate::infra::DB_PREFIX);
        for role in [&server, &consumer] {
            // The password is the name: unused with trust authentication, and enough with
            // password authentication on a machine whose server the bench may create roles on.
            admin
                .batch_execute(&format!(
                    "CREATE ROLE {r} LOGIN PASSWORD '{p}' IN ROLE {me}",
                    r = quote_identifier(role),
                    p = role,
                    me = quote_identifier(&me)
                ))
                .map_err(|e| format!("cannot create role {role} to tell the processes apart: {e}"))?;
        }
        let roles = Roles {
            server,
            consumer,
            admin,
        };
        let port = txoutbox::db::parse_url(&fresh.url, std::time::Duration::from_secs(10))
            .ok()
            .and_then(|config| config.get_ports().first().copied())
            .unwrap_or(5432);
        Ok(Counter {
            roles,
            client,
            port,
            deallocations: 0,
        })
    }

    /// Forgets what was counted in this database so far.
    pub fn reset(&mut self) -> Result<()> {
        self.client
            .query_one(RESET, &[])
            .map_err(|e| Error::db("cannot reset pg_stat_statements", e))?;
        self.deallocations = self
            .client
            .query_one(DEALLOCATIONS, &[])
            .map(|row| row.get(0))
            .unwrap_or(0);
        Ok(())
    }

    /// Requests each pid sent to Postgres so far (`None` when `ss` cannot tell).
    pub fn segments(&self, pids: &[u32]) -> std::result::Result<BTreeMap<u32, u64>, String> {
        tcp_requests(self.port, pids)
    }

    /// Reads what was counted since [`Counter::reset`], for `orders` orders.
    pub fn read(&mut self, orders: u64) -> Result<Counted> {
        let rows = self
            .client
            .query(READ, &[])
            .map_err(|e| Error::db("cannot read pg_stat_statements", e))?;
        let mut raw = Vec::new();
        for row in rows {
            let role: String = row.get(0);
            let query: Option<String> = row.get(1);
            let component = if role == self.roles.server {
                Some(Component::Http)
            } else if role == self.roles.consumer {
                Some(Component::Consumer)
            } else {
                None // the bench's own counting
            };
            if let Some(component) = component {
                raw.push(Statement {
                    component,
                    query: collapse(query.as_deref().unwrap_or("<query text not kept>")),
                    calls: row.get::<_, i64>(2).max(0) as u64,
                    rows: row.get::<_, i64>(3).max(0) as u64,
                    exec_ms: row.get(4),
                });
            }
        }
        let mut notes = Vec::new();
        let deallocations: i64 = self
            .client
            .query_one(DEALLOCATIONS, &[])
            .map(|row| row.get(0))
            .unwrap_or(0);
        if deallocations > self.deallocations {
            notes.push(format!(
                "pg_stat_statements evicted entries {} times during the window (pg_stat_statements.max): some counts may be low",
                deallocations - self.deallocations
            ));
        }
        Ok(Counted {
            orders,
            statements: attribute(raw),
            round_trips: Vec::new(),
            notes,
        })
    }
}

/// Splits the server's statements between the HTTP transaction and the relay, and sorts each
/// component's by execution time.
pub fn attribute(raw: Vec<Statement>) -> Vec<Statement> {
    let order_inserts: u64 = raw
        .iter()
        .filter(|s| s.component == Component::Http && inserts_into(&s.query, "orders"))
        .map(|s| s.calls)
        .sum();
    let mut out = Vec::new();
    for mut s in raw {
        if s.component != Component::Http {
            out.push(s);
            continue;
        }
        if is_rollback(&s.query) {
            s.component = Component::Relay;
            out.push(s);
            continue;
        }
        if is_transaction_control(&s.query) {
            // One BEGIN and one COMMIT per order insert are the HTTP transaction's.
            let http = s.calls.min(order_inserts);
            let relay = s.calls - http;
            if relay > 0 {
                let share = relay as f64 / s.calls as f64;
                out.push(Statement {
                    component: Component::Relay,
                    query: s.query.clone(),
                    calls: relay,
                    rows: 0,
                    exec_ms: s.exec_ms * share,
                });
                s.exec_ms *= 1.0 - share;
                s.calls = http;
            }
            if s.calls > 0 {
                out.push(s);
            }
            continue;
        }
        if is_relay(&s.query) {
            s.component = Component::Relay;
        }
        out.push(s);
    }
    out.sort_by(|a, b| {
        a.component
            .cmp(&b.component)
            .then(b.exec_ms.total_cmp(&a.exec_ms))
    });
    out
}

/// The relay's: it reads or changes the outbox without inserting into it, moves scheduled
/// events (anything on `outbox_scheduled` but the insert that schedules one, which is the
/// request's), or sets up its session (`LISTEN`, `SET`; the HTTP path's connections run no
/// such statement).
fn is_relay(query: &str) -> bool {
    let q = query.to_ascii_lowercase();
    if inserts_into(&q, "outbox_scheduled") {
        return false;
    }
    ["listen ", "unlisten ", "set "].iter().any(|p| q.starts_with(p))
        || q.contains("outbox_scheduled")
        || (q.contains("outbox") && !inserts_into(&q, "outbox"))
}

fn is_rollback(query: &str) -> bool {
    let q = query.trim().to_ascii_lowercase();
    matches!(q.split_whitespace().next(), Some("rollback" | "abort"))
}

fn is_transaction_control(query: &str) -> bool {
    let q = query.trim().trim_end_matches(';').to_ascii_lowercase();
    matches!(
        q.split_whitespace().next(),
        Some("begin" | "commit" | "start" | "end")
    )
}

/// True when `query` has `INSERT INTO [schema.]table`.
fn inserts_into(query: &str, table: &str) -> bool {
    let q = query.to_ascii_lowercase();
    let mut rest = q.as_str();
    while let Some(at) = rest.find("insert into ") {
        rest = &rest[at + "insert into ".len()..];
        let target = rest
            .split(|c: char| c.is_whitespace() || c == '(')
            .next()
            .unwrap_or("");
        let name = target.rsplit('.').next().unwrap_or("").trim_matches('"');
        if name == table {
            return true;
        }
    }
    false
}

/// Whitespace runs as one space.
fn collapse(query: &str) -> String {
    query.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Requests sent to Postgres on `port` by each of `pids`: the data segments sent on their
/// established connections (`ss -tinp`). The client writes each request (a `Bind`/`Execute`/
/// `Sync`, a `Parse`/`Describe`/`Sync`, a simple query) in one write, and on loopback one write
/// of this size is one segment, so this counts round trips.
pub fn tcp_requests(port: u16, pids: &[u32]) -> std::result::Result<BTreeMap<u32, u64>, String> {
    let output = Command::new("ss")
        .args(["-tinpH", "state", "established", &format!("( dport = :{port} )")])
        .output()
        .map_err(|e| format!("cannot run ss ({e}); install iproute2 to count round trips"))?;
    if !output.status.success() {
        return Err(format!(
            "ss failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(parse_ss(&String::from_utf8_lossy(&output.stdout), pids))
}

/// Sums `data_segs_out` per owning pid of `ss -tinpH` output, for `pids` only.
fn parse_ss(text: &str, pids: &[u32]) -> BTreeMap<u32, u64> {
    let mut out: BTreeMap<u32, u64> = pids.iter().map(|p| (*p, 0)).collect();
    let mut owner: Option<u32> = None;
    for token in text.split_whitespace() {
        if let Some(at) = token.find("pid=") {
            owner = token[at + 4..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|p| p.parse().ok());
        } else if let Some(value) = token.strip_prefix("data_segs_out:") {
            if let (Some(pid), Ok(n)) = (owner, value.parse::<u64>()) {
                if let Some(total) = out.get_mut(&pid) {
                    *total += n;
                }
            }
            owner = None;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(component: Component, query: &str, calls: u64) -> Statement {
        Statement {
            component,
            query: query.into(),
            calls,
            rows: calls,
            exec_ms: calls as f64,
        }
    }

    #[test]
    fn server_statements_are_split_between_http_and_relay() {
        let out = attribute(vec![
            statement(Component::Http, "BEGIN", 130),
            statement(Component::Http, "ROLLBACK", 5),
            statement(Component::Http, "SET synchronous_commit = off", 5),
            statement(Component::Http, "COMMIT", 130),
            statement(Component::Http, "INSERT INTO orders (id) VALUES ($1)", 100),
            statement(
                Component::Http,
                "INSERT INTO public.outbox (message_id) VALUES ($1)",
                100,
            ),
            statement(
                Component::Http,
                "WITH c AS (SELECT id FROM public.outbox FOR UPDATE SKIP LOCKED) SELECT 1",
                30,
            ),
            statement(
                Component::Http,
                "DELETE FROM public.outbox WHERE id = ANY($1)",
                30,
            ),
            statement(Component::Http, "LISTEN txoutbox_outbox", 1),
            statement(
                Component::Http,
                "WITH due AS (DELETE FROM public.outbox_scheduled RETURNING *) INSERT INTO public.outbox (a) SELECT 1",
                2,
            ),
            statement(Component::Http, "INSERT INTO public.outbox_scheduled (not_before) VALUES ($1)", 3),
            statement(Component::Consumer, "BEGIN", 10),
        ]);
        let calls = |component, query: &str| {
            out.iter()
                .filter(|s| s.component == component && s.query.starts_with(query))
                .map(|s| s.calls)
                .sum::<u64>()
        };
        assert_eq!(calls(Component::Http, "BEGIN"), 100);
        assert_eq!(calls(Component::Relay, "BEGIN"), 30);
        assert_eq!(calls(Component::Relay, "COMMIT"), 30);
        assert_eq!(
            calls(Component::Http, "INSERT INTO public.outbox (message_id)"),
            100
        );
        assert_eq!(calls(Component::Relay, "WITH c"), 30);
        assert_eq!(calls(Component::Relay, "DELETE"), 30);
        assert_eq!(calls(Component::Relay, "LISTEN"), 1);
        assert_eq!(calls(Component::Relay, "ROLLBACK"), 5);
        assert_eq!(calls(Component::Relay, "SET"), 5);
        assert_eq!(calls(Component::Relay, "WITH due"), 2);
        assert_eq!(calls(Component::Http, "INSERT INTO public.outbox_scheduled"), 3);
        assert_eq!(calls(Component::Consumer, "BEGIN"), 10);
        let counted = Counted {
            orders: 100,
            statements: out,
            ..Counted::default()
        };
        assert_eq!(counted.per_order(Component::Http).calls, 4.03);
        assert!((counted.per_order(Component::Relay).calls - 1.33).abs() < 1e-9);
    }

    #[test]
    fn inserts_are_recognised_with_or_without_schema() {
        assert!(inserts_into(
            "WITH l AS (SELECT 1) INSERT INTO public.outbox (a) SELECT 1",
            "outbox"
        ));
        assert!(inserts_into("insert into \"outbox\"(a) values (1)", "outbox"));
        assert!(!inserts_into(
            "INSERT INTO outbox_archive (a) VALUES (1)",
            "outbox"
        ));
        assert!(!inserts_into("DELETE FROM outbox", "outbox"));
    }

    #[test]
    fn ss_output_is_summed_per_process() {
        let text = "0 0 127.0.0.1:1 127.0.0.1:5432 users:((\"txoutbox-server\",pid=42,fd=9))\n\t cubic data_segs_out:7 data_segs_in:7\n\
                    0 0 127.0.0.1:2 127.0.0.1:5432 users:((\"txoutbox-server\",pid=42,fd=10))\n\t cubic data_segs_out:5\n\
                    0 0 127.0.0.1:3 127.0.0.1:5432 users:((\"other\",pid=7,fd=3))\n\t data_segs_out:100\n\
                    0 0 127.0.0.1:4 127.0.0.1:5432 users:((\"txoutbox-consum\",pid=43,fd=3))\n\t data_segs_in:2\n";
        let counted = parse_ss(text, &[42, 43]);
        assert_eq!(counted.get(&42), Some(&12));
        assert_eq!(counted.get(&43), Some(&0));
        assert_eq!(counted.get(&7), None);
    }
}
