//! W3C Trace Context (level 1) for events: the `traceparent` and `tracestate` an event carries
//! from the request that wrote it to the consumer that applies it.
//!
//! txoutbox records no spans of its own. An event carries the context it was given, unchanged:
//! the outbox row stores it, the relay sends it as the AMQP headers `traceparent` and
//! `tracestate`, and the consumer parses it back onto
//! [`Message::trace_context`](crate::Message::trace_context). A consumer's span is then a child
//! of the span that wrote the event. Set it with [`NewEvent::with_trace_context`](crate::NewEvent::with_trace_context).
//!
//! Parsing is strict, as the specification asks of a receiver: a `traceparent` that is not
//! version `00` with a 32-digit trace id and a 16-digit parent id (lowercase hex, neither all
//! zeros) and 2 hex digits of flags is refused, and so is a `tracestate` longer than
//! [`MAX_TRACESTATE_BYTES`], with more than [`MAX_TRACESTATE_MEMBERS`] entries, or with anything
//! but printable ASCII `key=value` entries. [`TraceContext::from_headers`] turns an invalid
//! `traceparent` into no context at all (the caller starts a new trace) and drops an invalid
//! `tracestate`, keeping the `traceparent`.

use std::fmt;

/// Name of the header (HTTP and AMQP) that carries the trace id, parent id and flags.
pub const TRACEPARENT: &str = "traceparent";

/// Name of the header (HTTP and AMQP) that carries vendor-specific trace data.
pub const TRACESTATE: &str = "tracestate";

/// Longest `tracestate` kept, in bytes: the 512 characters the specification asks every
/// vendor to pass on. A longer one is dropped.
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// Most list members a `tracestate` may have (the specification's limit).
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// Length of a version-00 `traceparent`: `00-` + 32 + `-` + 16 + `-` + 2.
const TRACEPARENT_LEN: usize = 55;

/// A valid W3C trace context: a `traceparent` and, optionally, a `tracestate`.
///
/// Made by [`parse`](Self::parse), [`from_headers`](Self::from_headers) or
/// [`new_root`](Self::new_root); it is always valid, so whatever carries it can send it as is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// `00-<trace id>-<parent id>-<flags>`, lowercase.
    traceparent: String,
    tracestate: Option<String>,
}

/// Why a `traceparent` or `tracestate` was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidTraceContext {
    /// Which header: [`TRACEPARENT`] or [`TRACESTATE`].
    pub header: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl fmt::Display for InvalidTraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.header, self.reason)
    }
}

impl std::error::Error for InvalidTraceContext {}

fn invalid_parent(reason: &'static str) -> InvalidTraceContext {
    InvalidTraceContext {
        header: TRACEPARENT,
        reason,
    }
}

fn invalid_state(reason: &'static str) -> InvalidTraceContext {
    InvalidTraceContext {
        header: TRACESTATE,
        reason,
    }
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl TraceContext {
    /// A new trace: a random trace id, a random parent id and flags `00` (not sampled: nothing
    /// was recorded under it). For a request that arrives without a valid `traceparent`.
    ///
    /// The ids come from random (version 4) UUIDs: the trace id has 122 random bits, the
    /// parent id 60; neither is ever all zeros.
    pub fn new_root() -> TraceContext {
        let trace_id = uuid::Uuid::new_v4();
        let parent_id = uuid::Uuid::new_v4();
        TraceContext {
            traceparent: format!(
                "00-{}-{}-00",
                hex(trace_id.as_bytes()),
                hex(&parent_id.as_bytes()[..8])
            ),
            tracestate: None,
        }
    }

    /// Parses a `traceparent` strictly: version `00`, a trace id of 32 lowercase hex digits not
    /// all zeros, a parent id of 16 not all zeros, and 2 hex digits of flags, separated by `-`,
    /// nothing before or after (trim an HTTP header's surrounding spaces first).
    ///
    /// Versions other than `00` are refused too: level 1 defines only `00`, and `ff` is invalid
    /// in every version.
    ///
    /// ```
    /// use txoutbox::trace::TraceContext;
    /// let context = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    /// assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    /// assert!(context.is_sampled());
    /// assert!(TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_err());
    /// ```
    pub fn parse(traceparent: &str) -> Result<TraceContext, InvalidTraceContext> {
        if !traceparent.is_ascii() {
            return Err(invalid_parent("not ASCII"));
        }
        let version = traceparent.get(..2).unwrap_or(traceparent);
        if version.len() != 2 || !is_lower_hex(version) {
            return Err(invalid_parent("the version is not 2 lowercase hex digits"));
        }
        if version != "00" {
            return Err(invalid_parent("only version 00 is supported"));
        }
        if traceparent.len() != TRACEPARENT_LEN {
            return Err(invalid_parent("a version 00 traceparent is 55 characters"));
        }
        let bytes = traceparent.as_bytes();
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(invalid_parent("the fields are not separated by '-'"));
        }
        let (trace_id, parent_id, flags) = (&traceparent[3..35], &traceparent[36..52], &traceparent[53..]);
        if !is_lower_hex(trace_id) {
            return Err(invalid_parent("the trace id is not 32 lowercase hex digits"));
        }
        if trace_id.bytes().all(|b| b == b'0') {
            return Err(invalid_parent("the trace id is all zeros"));
        }
        if !is_lower_hex(parent_id) {
            return Err(invalid_parent("the parent id is not 16 lowercase hex digits"));
        }
        if parent_id.bytes().all(|b| b == b'0') {
            return Err(invalid_parent("the parent id is all zeros"));
        }
        if !is_lower_hex(flags) {
            return Err(invalid_parent("the flags are not 2 lowercase hex digits"));
        }
        Ok(TraceContext {
            traceparent: traceparent.to_string(),
            tracestate: None,
        })
    }

    /// The same context with `tracestate` (surrounding spaces and tabs trimmed), if it is
    /// valid: printable ASCII, at most [`MAX_TRACESTATE_BYTES`] bytes and
    /// [`MAX_TRACESTATE_MEMBERS`] comma-separated `key=value` members (keys as the
    /// specification writes them: lowercase letters, digits, `_-*/`, one optional `@`; values
    /// printable ASCII without `,` or `=`, not ending in a space). An empty one means none.
    pub fn with_tracestate(self, tracestate: &str) -> Result<TraceContext, InvalidTraceContext> {
        let tracestate = tracestate.trim_matches([' ', '\t']);
        if tracestate.is_empty() {
            return Ok(TraceContext {
                tracestate: None,
                ..self
            });
        }
        check_tracestate(tracestate)?;
        Ok(TraceContext {
            tracestate: Some(tracestate.to_string()),
            ..self
        })
    }

    /// The context the two headers carry, as a receiver must read them: `None` when
    /// `traceparent` is absent or invalid (the caller starts a new trace, and the `tracestate`
    /// goes with it); an invalid `tracestate` is dropped and the `traceparent` kept.
    pub fn from_headers(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<TraceContext> {
        let context = TraceContext::parse(traceparent?).ok()?;
        match tracestate {
            None => Some(context),
            Some(state) => Some(context.clone().with_tracestate(state).unwrap_or(context)),
        }
    }

    /// The `traceparent` header value, `00-<trace id>-<parent id>-<flags>`.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` header value, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The trace id: 32 lowercase hex digits, the same for every event and span of a trace.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The parent id: 16 lowercase hex digits, the span that wrote the event.
    pub fn parent_id(&self) -> &str {
        &self.traceparent[36..52]
    }

    /// The trace flags (bit 0: sampled).
    pub fn flags(&self) -> u8 {
        u8::from_str_radix(&self.traceparent[53..55], 16).unwrap_or(0)
    }

    /// Whether the caller may have recorded the trace (flag bit 0).
    pub fn is_sampled(&self) -> bool {
        self.flags() & 1 == 1
    }
}

impl fmt::Display for TraceContext {
    /// The `traceparent`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent)
    }
}

/// The characters of a key after its first: lowercase letters, digits, `_ - * /`.
fn is_key_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'*' | b'/')
}

/// A `simple-key`, or a `multi-tenant-key` (`tenant@system`), of W3C Trace Context level 1.
fn is_valid_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    match key.split_once('@') {
        None => {
            (1..=256).contains(&bytes.len())
                && bytes[0].is_ascii_lowercase()
                && bytes.iter().all(|&b| is_key_char(b))
        }
        Some((tenant, system)) => {
            let (t, s) = (tenant.as_bytes(), system.as_bytes());
            (1..=241).contains(&t.len())
                && (t[0].is_ascii_lowercase() || t[0].is_ascii_digit())
                && t.iter().all(|&b| is_key_char(b))
                && (1..=14).contains(&s.len())
                && s[0].is_ascii_lowercase()
                && s.iter().all(|&b| is_key_char(b))
        }
    }
}

/// A value: 1 to 256 printable ASCII characters other than `,` and `=`, the last not a space.
fn is_valid_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    (1..=256).contains(&bytes.len())
        && bytes
            .iter()
            .all(|&b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
        && bytes[bytes.len() - 1] != b' '
}

fn check_tracestate(tracestate: &str) -> Result<(), InvalidTraceContext> {
    if tracestate.len() > MAX_TRACESTATE_BYTES {
        return Err(invalid_state("longer than 512 bytes"));
    }
    if !tracestate
        .bytes()
        .all(|b| (0x20..=0x7e).contains(&b) || b == b'\t')
    {
        return Err(invalid_state("not printable ASCII"));
    }
    let mut members = 0;
    for member in tracestate.split(',') {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            continue;
        }
        members += 1;
        if members > MAX_TRACESTATE_MEMBERS {
            return Err(invalid_state("more than 32 list members"));
        }
        let Some((key, value)) = member.split_once('=') else {
            return Err(invalid_state("a list member is not key=value"));
        };
        if !is_valid_key(key) {
            return Err(invalid_state("a key is not a valid tracestate key"));
        }
        if !is_valid_value(value) {
            return Err(invalid_state("a value is not a valid tracestate value"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_parses_into_its_fields() {
        let context = TraceContext::parse(VALID).unwrap();
        assert_eq!(context.traceparent(), VALID);
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.parent_id(), "00f067aa0ba902b7");
        assert_eq!(context.flags(), 1);
        assert!(context.is_sampled());
        assert_eq!(context.tracestate(), None);
        assert_eq!(context.to_string(), VALID);
        let unsampled =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.is_sampled());
        // Flags other than the sampled bit are carried as they are.
        let other_flags =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-fe").unwrap();
        assert_eq!(other_flags.flags(), 0xfe);
        assert!(!other_flags.is_sampled());
    }

    #[test]
    fn each_invalid_traceparent_is_refused_with_its_reason() {
        for (traceparent, reason) in [
            ("", "the version is not 2 lowercase hex digits"),
            ("0", "the version is not 2 lowercase hex digits"),
            (
                "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "the version is not 2 lowercase hex digits",
            ),
            (
                "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "the version is not 2 lowercase hex digits",
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "only version 00 is supported",
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "only version 00 is supported",
            ),
            // Too short, too long, trailing data, surrounding space.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
                "a version 00 traceparent is 55 characters",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
                "a version 00 traceparent is 55 characters",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                "a version 00 traceparent is 55 characters",
            ),
            (
                " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "the version is not 2 lowercase hex digits",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
                "a version 00 traceparent is 55 characters",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
                "the fields are not separated by '-'",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
                "the fields are not separated by '-'",
            ),
            // Trace id: uppercase, not hex, all zeros.
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "the trace id is not 32 lowercase hex digits",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                "the trace id is not 32 lowercase hex digits",
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "the trace id is all zeros",
            ),
            // Parent id: uppercase, not hex, all zeros.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
                "the parent id is not 16 lowercase hex digits",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bx-01",
                "the parent id is not 16 lowercase hex digits",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "the parent id is all zeros",
            ),
            // Flags: uppercase, not hex.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
                "the flags are not 2 lowercase hex digits",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-g1",
                "the flags are not 2 lowercase hex digits",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é",
                "not ASCII",
            ),
        ] {
            let refused = TraceContext::parse(traceparent).expect_err(traceparent);
            assert_eq!(refused.header, TRACEPARENT, "{traceparent:?}");
            assert_eq!(refused.reason, reason, "{traceparent:?}");
        }
    }

    #[test]
    fn a_new_root_is_a_valid_unsampled_trace_of_its_own() {
        let a = TraceContext::new_root();
        let b = TraceContext::new_root();
        assert_eq!(TraceContext::parse(a.traceparent()).as_ref(), Ok(&a));
        assert_ne!(a.trace_id(), b.trace_id());
        assert_ne!(a.parent_id(), b.parent_id());
        assert!(!a.is_sampled());
        assert_eq!(a.tracestate(), None);
    }

    #[test]
    fn a_valid_tracestate_is_kept_trimmed() {
        let context = TraceContext::parse(VALID).unwrap();
        for (given, kept) in [
            ("congo=t61rcWkgMzE", Some("congo=t61rcWkgMzE")),
            (
                " rojo=00f067aa0ba902b7,congo=t61rcWkgMzE\t",
                Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
            ),
            (
                "fw529a3039@dt=Jq8EbYlQ4Fg, ,vendor_1-x*/y=a b",
                Some("fw529a3039@dt=Jq8EbYlQ4Fg, ,vendor_1-x*/y=a b"),
            ),
            ("", None),
            ("  ", None),
        ] {
            let with = context.clone().with_tracestate(given).expect(given);
            assert_eq!(with.tracestate(), kept, "{given:?}");
            assert_eq!(with.traceparent(), VALID);
        }
    }

    #[test]
    fn each_invalid_tracestate_is_refused_with_its_reason() {
        let context = TraceContext::parse(VALID).unwrap();
        let too_long = format!("a={}", "x".repeat(MAX_TRACESTATE_BYTES));
        let too_many = (0..=MAX_TRACESTATE_MEMBERS)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        for (tracestate, reason) in [
            (too_long.as_str(), "longer than 512 bytes"),
            (too_many.as_str(), "more than 32 list members"),
            ("congo=caf\u{e9}", "not printable ASCII"),
            ("congo=a\u{7}b", "not printable ASCII"),
            ("congo=a\nb", "not printable ASCII"),
            ("congo", "a list member is not key=value"),
            ("Congo=x", "a key is not a valid tracestate key"),
            ("1congo=x", "a key is not a valid tracestate key"),
            ("=x", "a key is not a valid tracestate key"),
            ("a@b@c=x", "a key is not a valid tracestate key"),
            ("tenant@Sys=x", "a key is not a valid tracestate key"),
            ("congo=", "a value is not a valid tracestate value"),
            ("congo=a=b", "a value is not a valid tracestate value"),
        ] {
            let refused = context.clone().with_tracestate(tracestate).expect_err(tracestate);
            assert_eq!(refused.header, TRACESTATE, "{tracestate:?}");
            assert_eq!(refused.reason, reason, "{tracestate:?}");
        }
        // Exactly at the limits is fine.
        let at_limit = (0..MAX_TRACESTATE_MEMBERS)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(context.clone().with_tracestate(&at_limit).is_ok());
        let longest = format!("a={},b={}", "x".repeat(254), "y".repeat(253));
        assert_eq!(longest.len(), MAX_TRACESTATE_BYTES);
        assert!(context.with_tracestate(&longest).is_ok());
    }

    #[test]
    fn headers_read_as_a_receiver_must() {
        assert_eq!(TraceContext::from_headers(None, Some("congo=x")), None);
        assert_eq!(TraceContext::from_headers(Some("garbage"), Some("congo=x")), None);
        let kept = TraceContext::from_headers(Some(VALID), Some("congo=x")).unwrap();
        assert_eq!(kept.tracestate(), Some("congo=x"));
        // An invalid tracestate is dropped; the traceparent stays.
        let dropped = TraceContext::from_headers(Some(VALID), Some("Bad Key=x")).unwrap();
        assert_eq!(dropped.traceparent(), VALID);
        assert_eq!(dropped.tracestate(), None);
    }
}
