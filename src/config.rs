//! Configuration of each component. Every field documents its default; `validate` runs once
//! when a component starts.

use std::time::Duration;

use crate::{Error, Result};

/// Settings of the relay that moves outbox rows to RabbitMQ.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Worker threads, each with its own broker connection (`RELAY_WORKERS`, default 5).
    pub workers: usize,
    /// Rows claimed, published and deleted per round (`RELAY_BATCH`, default 200).
    pub batch_size: i64,
    /// Longest idle wait between claims when no notification arrives (default 1 s).
    pub poll_interval: Duration,
    /// How long a worker woken by a new event waits before it claims (`RELAY_LINGER_MS`,
    /// default 2 ms, at most 1 s; zero: not at all). Events committed meanwhile wake no other
    /// worker and go out in the same round: under load, fewer and fuller rounds (less CPU per
    /// event in Postgres, the relay and RabbitMQ, and a shorter tail) for this much more
    /// latency at the median. Full batches never wait.
    pub linger: Duration,
    /// How long to wait for the broker's confirms of one batch (default 10 s).
    pub confirm_timeout: Duration,
    /// Delay before a refused event is tried again (default 5 s; doubles with each attempt, up
    /// to an hour).
    pub retry_delay: Duration,
    /// Refusals (nack or unroutable) after which an event is marked failed and no longer tried
    /// until re-queued (`RELAY_MAX_ATTEMPTS`, default 10). A broker outage uses no attempts.
    pub max_attempts: i32,
    /// First delay before reconnecting after a failure (default 100 ms, doubled up to `max_backoff`).
    pub min_backoff: Duration,
    /// Cap of the reconnect delay (default 10 s).
    pub max_backoff: Duration,
    /// Whether events of one aggregate must be published in commit order (`RELAY_ORDERING`,
    /// default [`RelayOrdering::None`]).
    pub ordering: RelayOrdering,
    /// The CloudEvents `source` of every event the relay publishes (`cloudEvents:source`): a
    /// URI reference in which `{aggregate_type}` stands for the event's aggregate type,
    /// percent-encoded (`RELAY_CLOUDEVENTS_SOURCE`, default
    /// [`DEFAULT_CLOUDEVENTS_SOURCE`](crate::broker::DEFAULT_CLOUDEVENTS_SOURCE),
    /// `/txoutbox/{aggregate_type}`). CloudEvents identifies an event by `source` and `id`
    /// together: give each service a source of its own, e.g.
    /// `https://billing.example.com/{aggregate_type}` or `urn:billing:{aggregate_type}`.
    pub cloudevents_source: String,
}

/// In what order the relay publishes events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RelayOrdering {
    /// No promise: rows are claimed in id order by several workers, and a refused event is
    /// retried later while the events behind it go ahead (`RELAY_ORDERING=none`).
    #[default]
    None,
    /// Events of one aggregate (same `aggregate_type` and `aggregate_id`) are published in the
    /// order their transactions committed: an event is not claimed while an earlier event of its
    /// aggregate is still in the outbox (being published, waiting for a retry, or failed).
    /// Other aggregates are not held up (`RELAY_ORDERING=aggregate`). Commit order is outbox id
    /// order only if concurrent writers of an aggregate take turns: see
    /// [`Outbox::enqueue_ordered`](crate::outbox::Outbox::enqueue_ordered).
    Aggregate,
}

impl std::str::FromStr for RelayOrdering {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(RelayOrdering::None),
            "aggregate" => Ok(RelayOrdering::Aggregate),
            _ => Err(format!("expected none or aggregate, got {text:?}")),
        }
    }
}

impl std::fmt::Display for RelayOrdering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RelayOrdering::None => "none",
            RelayOrdering::Aggregate => "aggregate",
        })
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            workers: 5,
            batch_size: 200,
            poll_interval: Duration::from_secs(1),
            linger: DEFAULT_RELAY_LINGER,
            confirm_timeout: Duration::from_secs(10),
            retry_delay: Duration::from_secs(5),
            max_attempts: 10,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            ordering: RelayOrdering::None,
            cloudevents_source: crate::broker::DEFAULT_CLOUDEVENTS_SOURCE.to_string(),
        }
    }
}

/// [`RelayConfig::linger`] by default.
pub const DEFAULT_RELAY_LINGER: Duration = Duration::from_millis(2);

/// Longest [`RelayConfig::linger`]: beyond it the wait is a poll interval, not a linger.
pub const MAX_RELAY_LINGER: Duration = Duration::from_secs(1);

/// Longest [`RelayConfig::cloudevents_source`] template, in bytes.
pub const MAX_CLOUDEVENTS_SOURCE_BYTES: usize = 1024;

/// Whether `b` may appear in a URI reference (RFC 3986: unreserved, reserved, or `%`).
fn is_uri_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=%".contains(&b)
}

/// Most refusals [`RelayConfig::max_attempts`] may allow: past a few dozen the wait between
/// attempts is an hour each, so this is already weeks.
pub const MAX_RELAY_ATTEMPTS: i32 = 1000;

impl RelayConfig {
    /// The `cloudEvents:source` of an event of `aggregate_type`: [`cloudevents_source`](Self::cloudevents_source)
    /// with the aggregate type in place of `{aggregate_type}`.
    pub fn cloudevents_source_for(&self, aggregate_type: &str) -> String {
        crate::broker::cloudevents_source(&self.cloudevents_source, aggregate_type)
    }

    /// Checks that the values can work together.
    pub fn validate(&self) -> Result<()> {
        let source = self.cloudevents_source.replace("{aggregate_type}", "x");
        if source.is_empty()
            || self.cloudevents_source.len() > MAX_CLOUDEVENTS_SOURCE_BYTES
            || !source.bytes().all(is_uri_char)
        {
            return Err(Error::Config(format!(
                "RelayConfig::cloudevents_source (RELAY_CLOUDEVENTS_SOURCE) must be a non-empty URI \
                 reference of at most {MAX_CLOUDEVENTS_SOURCE_BYTES} bytes (letters, digits and \
                 -._~:/?#[]@!$&'()*+,;=%, with {{aggregate_type}} where the aggregate type goes), \
                 got {:?}",
                self.cloudevents_source
            )));
        }
        if self.workers == 0 || self.workers > 64 {
            return Err(Error::Config(format!(
                "RelayConfig::workers (RELAY_WORKERS) must be 1..=64, got {}",
                self.workers
            )));
        }
        if self.confirm_timeout < Duration::from_millis(100)
            || self.confirm_timeout > Duration::from_secs(600)
        {
            return Err(Error::Config(format!(
                "RelayConfig::confirm_timeout (RELAY_CONFIRM_TIMEOUT) must be 0.1 s..=600 s, got {:?}",
                self.confirm_timeout
            )));
        }
        if !(1..=MAX_RELAY_ATTEMPTS).contains(&self.max_attempts) {
            return Err(Error::Config(format!(
                "RelayConfig::max_attempts (RELAY_MAX_ATTEMPTS) must be 1..={MAX_RELAY_ATTEMPTS}, got {}",
                self.max_attempts
            )));
        }
        if self.linger > MAX_RELAY_LINGER {
            return Err(Error::Config(format!(
                "RelayConfig::linger (RELAY_LINGER_MS) must be at most {} ms, got {:?}",
                MAX_RELAY_LINGER.as_millis(),
                self.linger
            )));
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return Err(Error::Config(format!(
                "RelayConfig::batch_size (RELAY_BATCH) must be 1..=10000, got {}",
                self.batch_size
            )));
        }
        Ok(())
    }
}

/// Settings of the idempotent consumer.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// Unacknowledged deliveries the broker may push ahead (`CONSUMER_PREFETCH`, default 256).
    pub prefetch: u16,
    /// Deliveries applied in one database transaction and acked together (`CONSUMER_BATCH`,
    /// default 100).
    pub batch_size: usize,
    /// Redeliveries of a message whose handler failed transiently before it is dead-lettered
    /// (`CONSUMER_MAX_RETRIES`, default 5).
    pub max_retries: u32,
    /// Pause before a transiently failed message, and the deliveries after it, are handed back
    /// for redelivery in their order (default 200 ms).
    pub retry_delay: Duration,
    /// First reconnect delay (default 100 ms, doubled up to `max_backoff`).
    pub min_backoff: Duration,
    /// Cap of the reconnect delay (default 10 s).
    pub max_backoff: Duration,
    /// Name the consumer records processed message ids under (`CONSUMER_NAME`); `None`: its
    /// queue's name. Consumers of different queues on one database keep apart which messages
    /// each applied; two consumers with one name share that record (a second instance of one
    /// consumer must use the same name).
    pub name: Option<String>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            prefetch: 256,
            batch_size: 100,
            max_retries: 5,
            retry_delay: Duration::from_millis(200),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            name: None,
        }
    }
}

impl ConsumerConfig {
    /// Checks that the values can work together.
    pub fn validate(&self) -> Result<()> {
        if self.prefetch == 0 {
            return Err(Error::Config(
                "ConsumerConfig::prefetch (CONSUMER_PREFETCH) must be at least 1".into(),
            ));
        }
        if self.batch_size == 0 || self.batch_size > usize::from(self.prefetch) {
            return Err(Error::Config(format!(
                "ConsumerConfig::batch_size (CONSUMER_BATCH) must be 1..=prefetch ({}), got {}",
                self.prefetch, self.batch_size
            )));
        }
        if self
            .name
            .as_deref()
            .is_some_and(|n| n.is_empty() || n.len() > 200)
        {
            return Err(Error::Config(
                "ConsumerConfig::name (CONSUMER_NAME) must be 1 to 200 bytes when set".into(),
            ));
        }
        Ok(())
    }
}

/// Returns `url` with its password replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let url = &redact_password_parameters(url);
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme_end], &userinfo[..colon], &rest[at..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// `text` with the value of every `password=` parameter replaced by `***`: in a key=value
/// connection string (`host=h password=secret`, also quoted) and in a URL's query.
fn redact_password_parameters(text: &str) -> String {
    const KEY: &str = "password=";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(found) = rest.find(KEY) {
        let starts_parameter = found == 0
            || rest[..found]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_whitespace() || c == '?' || c == '&');
        let value_start = found + KEY.len();
        out.push_str(&rest[..value_start]);
        let after = &rest[value_start..];
        if !starts_parameter {
            rest = after;
            continue;
        }
        let value_len = if let Some(quoted) = after.strip_prefix('\'') {
            // Up to the closing quote that is not escaped with a backslash.
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| {
                    let closes = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    closes
                })
                .map_or(after.len(), |(i, _)| i + 2)
        } else {
            after
                .find(|c: char| c.is_whitespace() || c == '&')
                .unwrap_or(after.len())
        };
        out.push_str("***");
        rest = &after[value_len..];
    }
    out.push_str(rest);
    out
}

/// Returns `text` with the password of every URL in it replaced by `***`: for messages of
/// other crates that print the URL they were given (amiquip does).
pub fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(found) = rest.find("://") {
        let start = found + 3;
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let end = after
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace())
            .unwrap_or(after.len());
        let authority = &after[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&authority[..colon]);
                out.push_str(":***");
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::{redact_url, redact_urls_in, RelayOrdering};

    #[test]
    fn relay_ordering_parses_its_two_values_only() {
        assert_eq!("none".parse(), Ok(RelayOrdering::None));
        assert_eq!(" Aggregate ".parse(), Ok(RelayOrdering::Aggregate));
        let error = "strict".parse::<RelayOrdering>().unwrap_err();
        assert_eq!(error, "expected none or aggregate, got \"strict\"");
        assert_eq!(RelayOrdering::Aggregate.to_string(), "aggregate");
    }

    #[test]
    fn redacts_urls_inside_messages() {
        assert_eq!(
            redact_urls_in(
                "failed to connect to amqp://guest:s3cret@h:5672/%2f: refused; again amqp://u:p@x"
            ),
            "failed to connect to amqp://guest:***@h:5672/%2f: refused; again amqp://u:***@x"
        );
        assert_eq!(redact_urls_in("no url here: a:b@c"), "no url here: a:b@c");
        assert_eq!(redact_urls_in("http://h:80/x"), "http://h:80/x");
    }

    #[test]
    fn redacts_password_parameters_in_both_forms() {
        assert_eq!(
            redact_url("host=h user=u password=secret dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert_eq!(
            redact_url("host=h password='se cr\\'et' dbname=d"),
            "host=h password=*** dbname=d"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=secret&x=1"),
            "postgres://u@h/db?sslmode=require&password=***&x=1"
        );
        assert_eq!(redact_url("host=h old_password=x"), "host=h old_password=x");
    }

    #[test]
    fn redacts_the_password_only() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact_url("amqp://guest:p%40ss@h/%2f?heartbeat=5"),
            "amqp://guest:***@h/%2f?heartbeat=5"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db?x=a:b@c"), "postgres://h/db?x=a:b@c");
        assert_eq!(redact_url("host=h user=u"), "host=h user=u");
    }
}
