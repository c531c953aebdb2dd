//! Prepared statements for handlers: the consumer lends its connection's statement cache to
//! the handler for the length of its call, and [`prepared`] reads and fills it.

use std::cell::RefCell;
use std::collections::HashMap;

use postgres::{Statement, Transaction};

use crate::db::MAX_PREPARED;

/// Prepared statements by SQL text, of one connection.
pub(crate) type Statements = HashMap<String, Statement>;

thread_local! {
    /// The statements of the connection the running handler's transaction is on.
    static LENT: RefCell<Option<Statements>> = const { RefCell::new(None) };
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
/// Use the statement on `tx` only (another connection does not know it).
pub fn prepared(tx: &mut Transaction<'_>, sql: &str) -> Result<Statement, postgres::Error> {
    LENT.with_borrow_mut(|lent| {
        let Some(statements) = lent else {
            return tx.prepare(sql);
        };
        if let Some(statement) = statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = tx.prepare(sql)?;
        if statements.len() >= MAX_PREPARED {
            statements.clear();
        }
        statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    })
}

/// Runs `call` with `statements` lent to [`prepared`] (they must be those of the connection
/// `call`'s transaction is on), and takes them back, with what it added, whatever `call` returns.
pub(crate) fn lend<T>(statements: &mut Statements, call: impl FnOnce() -> T) -> T {
    LENT.with_borrow_mut(|lent| *lent = Some(std::mem::take(statements)));
    let result = call();
    if let Some(back) = LENT.with_borrow_mut(Option::take) {
        *statements = back;
    }
    result
}
