//! Prepared statements for handlers: the consumer lends its connection's statement cache to
//! the handler for the length of its call, and [`prepared`] reads and fills it.

use std::cell::RefCell;
use std::collections::HashMap;

use postgres::{Statement, Transaction};

use crate::db::kept;

/// Prepared statements by SQL text, of one connection.
pub(crate) type Statements = HashMap<String, Statement>;

/// Statements lent to the handler running on this thread: those of the connection of the
/// transaction at `at`, the one the handler was given.
struct Lent {
    at: usize,
    statements: Statements,
}

thread_local! {
    static LENT: RefCell<Option<Lent>> = const { RefCell::new(None) };
}

/// The address that identifies `tx` to [`prepared`] while it is lent.
pub(crate) fn address_of(tx: &Transaction<'_>) -> usize {
    std::ptr::from_ref(tx) as usize
}

/// The prepared form of `sql` on `tx`, for a [`Handler`](super::Handler)'s statements: inside a
/// handler the consumer calls, prepared once per connection of the library's pool (once per
/// batch with a pool of the caller's) and kept; elsewhere prepared anew, as `tx.prepare` is.
///
/// A statement run with its text (`tx.execute("UPDATE ...", ..)`) is parsed, planned and closed
/// on every call: two round trips and a close. Prepared here, it is one round trip, planned once:
///
/// ```no_run
/// # use postgres::Transaction;
/// # use txoutbox::{HandlerError, Message};
/// fn handle(tx: &mut Transaction<'_>, message: &Message) -> Result<(), HandlerError> {
///     let bump = txoutbox::consumer::prepared(tx, "UPDATE accounts SET events = events + 1 WHERE id = $1")?;
///     tx.execute(&bump, &[&message.aggregate_id])?;
///     Ok(())
/// }
/// ```
///
/// Only the transaction the handler was given uses the kept statements; on any other (a
/// savepoint of it, another connection) this prepares anew. Use the statement on `tx` only.
pub fn prepared(tx: &mut Transaction<'_>, sql: &str) -> Result<Statement, postgres::Error> {
    let at = address_of(tx);
    LENT.with_borrow_mut(|lent| match lent.as_mut().filter(|lent| lent.at == at) {
        Some(Lent { statements, .. }) => kept(statements, sql, |sql| tx.prepare(sql)),
        None => tx.prepare(sql),
    })
}

/// Runs `call` with `statements` lent to [`prepared`] for the transaction at `at` (see
/// [`address_of`]; they must be those of its connection), and takes them back, with what it
/// added, whatever `call` returns.
pub(crate) fn lend<T>(statements: &mut Statements, at: usize, call: impl FnOnce() -> T) -> T {
    let statements_out = std::mem::take(statements);
    LENT.with_borrow_mut(|lent| {
        *lent = Some(Lent {
            at,
            statements: statements_out,
        })
    });
    let result = call();
    if let Some(back) = LENT.with_borrow_mut(Option::take) {
        *statements = back.statements;
    }
    result
}
