//! The crate's error type.

use std::fmt;

/// Everything that can go wrong in txoutbox, with enough context to act on.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A Postgres call failed; `context` says what we were doing.
    Db {
        /// What txoutbox was doing when the call failed.
        context: String,
        /// The driver's error.
        source: postgres::Error,
    },
    /// No pooled database connection became free in time, or none could be opened.
    Pool {
        /// What txoutbox was doing when the pool failed.
        context: String,
        /// The pool's error.
        source: r2d2::Error,
    },
    /// A RabbitMQ call failed; `context` says what we were doing.
    Broker {
        /// What txoutbox was doing when the call failed.
        context: String,
        /// The client's error (boxed: it is large).
        source: Box<amiquip::Error>,
    },
    /// A diesel call failed (feature `diesel`); `context` says what we were doing.
    #[cfg(feature = "diesel")]
    Diesel {
        /// What txoutbox (or, through `?` in a diesel transaction, the caller) was doing.
        context: String,
        /// diesel's error.
        source: ::diesel::result::Error,
    },
    /// A setting has a value txoutbox cannot use.
    Config(String),
    /// Anything else, already phrased for a person.
    Other(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps a Postgres error with what we were doing.
    pub fn db(context: impl Into<String>, source: postgres::Error) -> Self {
        Error::Db {
            context: context.into(),
            source,
        }
    }

    /// Wraps a pool error with what we were doing.
    pub fn pool(context: impl Into<String>, source: r2d2::Error) -> Self {
        Error::Pool {
            context: context.into(),
            source,
        }
    }

    /// Wraps a RabbitMQ error with what we were doing.
    pub fn broker(context: impl Into<String>, source: amiquip::Error) -> Self {
        Error::Broker {
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// Wraps a diesel error with what we were doing (feature `diesel`).
    #[cfg(feature = "diesel")]
    pub fn diesel(context: impl Into<String>, source: ::diesel::result::Error) -> Self {
        Error::Diesel {
            context: context.into(),
            source,
        }
    }

    /// True when the database is unreachable or the call may succeed if simply retried
    /// (connection lost, pool exhausted, serialization failure, deadlock, shutdown).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Pool { .. } => true,
            Error::Db { source, .. } => is_transient_db_error(source),
            #[cfg(feature = "diesel")]
            Error::Diesel { source, .. } => {
                use ::diesel::result::{DatabaseErrorKind, Error as DieselError};
                matches!(
                    source,
                    DieselError::DatabaseError(
                        DatabaseErrorKind::SerializationFailure | DatabaseErrorKind::ClosedConnection,
                        _
                    )
                )
            }
            _ => false,
        }
    }
}

/// True for Postgres errors worth retrying: a closed connection, or a SQLSTATE in the classes
/// for connection exceptions (08), serialization failures and deadlocks (40), insufficient
/// resources (53), operator intervention such as a shutdown (57) and system errors (58).
pub fn is_transient_db_error(err: &postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.code() {
        Some(code) => {
            let c = code.code();
            ["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| c.starts_with(class))
        }
        // No SQLSTATE: an I/O or protocol error, i.e. the connection is gone.
        None => err.as_db_error().is_none(),
    }
}

/// True for the errors of a statement prepared on a connection that no longer matches it: its
/// result type changed (a migration altered a table it reads), or the server no longer has it
/// (`DEALLOCATE`, a pooler between). Not the data's fault: prepare it again and retry.
pub(crate) fn is_stale_statement(err: &postgres::Error) -> bool {
    let Some(db) = err.as_db_error() else {
        return false;
    };
    let code = db.code();
    *code == postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME
        || (*code == postgres::error::SqlState::FEATURE_NOT_SUPPORTED
            && db
                .message()
                .starts_with("cached plan must not change result type"))
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Error::Db { context, source } => match source.as_db_error() {
                Some(db) => format!("{context}: {} ({})", db.message(), db.code().code()),
                None => format!("{context}: {source}"),
            },
            Error::Pool { context, source } => format!("{context}: {source}"),
            Error::Broker { context, source } => format!("{context}: {source}"),
            #[cfg(feature = "diesel")]
            Error::Diesel { context, source } => format!("{context}: {source}"),
            Error::Config(msg) | Error::Other(msg) => msg.clone(),
        };
        // Some sources print the URL they were given, password included.
        f.write_str(&crate::config::redact_urls_in(&text))
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Db { source, .. } => Some(source),
            Error::Pool { source, .. } => Some(source),
            Error::Broker { source, .. } => Some(source.as_ref()),
            #[cfg(feature = "diesel")]
            Error::Diesel { source, .. } => Some(source),
            Error::Config(_) | Error::Other(_) => None,
        }
    }
}

/// Lets a closure given to diesel's `Connection::transaction` return [`Result`] and use `?` on
/// diesel calls (the transaction's own `BEGIN` and `COMMIT` errors arrive this way too).
#[cfg(feature = "diesel")]
impl From<::diesel::result::Error> for Error {
    fn from(source: ::diesel::result::Error) -> Self {
        Error::diesel("a diesel call failed", source)
    }
}
