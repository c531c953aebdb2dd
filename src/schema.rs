//! The Postgres schema that holds the library's tables, and the library's SQL written for it.
//!
//! Every statement the library runs names its tables with their schema (`"billing".outbox`),
//! so it works on any connection, whatever that connection's `search_path`.

use std::fmt;
use std::sync::Arc;

use crate::{Error, Result};

/// Where a statement template puts the quoted schema name.
const PLACEHOLDER: &str = "{schema}";

/// A validated Postgres schema name: letters, digits and `_`, not starting with a digit, at
/// most 63 bytes. [`Schema::default`] is `public`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Schema {
    name: Arc<str>,
}

impl Schema {
    /// The schema named `name`, or an error saying what a valid name is.
    pub fn new(name: &str) -> Result<Schema> {
        if !crate::db::is_plain_identifier(name) {
            return Err(Error::Config(format!(
                "the txoutbox schema name must be letters, digits and _ (not starting with a digit, \
                 at most 63 bytes), got {name:?}"
            )));
        }
        Ok(Schema { name: name.into() })
    }

    /// The schema's name, unquoted.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `template` with every `{schema}` replaced by the quoted schema name.
    pub fn qualify(&self, template: &str) -> String {
        template.replace(PLACEHOLDER, &crate::db::quote_identifier(&self.name))
    }
}

impl Default for Schema {
    fn default() -> Self {
        Schema {
            name: crate::migrate::DEFAULT_SCHEMA.into(),
        }
    }
}

impl fmt::Display for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schema({})", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::Schema;

    #[test]
    fn names_are_validated_and_quoted() {
        let schema = Schema::new("billing_outbox").expect("a plain name");
        assert_eq!(
            schema.qualify("SELECT 1 FROM {schema}.outbox"),
            "SELECT 1 FROM \"billing_outbox\".outbox"
        );
        assert_eq!(Schema::default().name(), "public");
        for bad in ["", "1x", "a-b", "a\"b", "a.b", &"x".repeat(64)] {
            assert!(Schema::new(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
