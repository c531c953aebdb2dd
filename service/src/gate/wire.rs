//! HTTP/1.1 framing as the gate checks it (RFC 9112): a request head read under limits, the
//! refusals it answers with, and a response read back from tiny_http.

use std::io::{self, Read};
use std::time::Instant;

/// Why a request is refused before it reaches a handler: the status, the metrics reason and
/// the message sent to the client. The connection is closed after each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(status: u16, reason: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason,
            message: message.into(),
        }
    }

    /// The whole response: a JSON error body and `Connection: close`.
    pub fn response(&self) -> Vec<u8> {
        let body = serde_json::json!({ "error": self.message }).to_string();
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.status,
            reason_phrase(self.status),
            body.len()
        )
        .into_bytes()
    }
}

/// The standard phrase of the statuses the gate and the API send.
pub(crate) fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

/// Limits on what one request may be.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeadLimits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: usize,
}

/// A request head that passed the checks, ready to be passed on.
#[derive(Debug)]
pub(crate) struct Head {
    pub method: String,
    pub target: String,
    /// Header fields to pass on (framing and hop-by-hop fields removed).
    pub headers: Vec<(String, Vec<u8>)>,
    pub content_length: usize,
    pub expects_continue: bool,
    /// Whether the client wants the connection kept after this request.
    pub keep_alive: bool,
}

/// Fields that describe one hop, never passed on (RFC 9110 7.6.1), and the framing we redo.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "expect",
    "trailer",
];

/// Where the head ends in `buf` (after its blank line), looking from `from` on: a head ends at
/// the first empty line, CRLF or bare LF.
pub(crate) fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let mut i = start;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// Checks the request line as soon as it is complete, so that a request of another protocol
/// (the HTTP/2 preface, `PRI * HTTP/2.0`) is refused at once rather than after its "head".
pub(crate) fn check_request_line(buf: &[u8]) -> Result<(), Refusal> {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return Ok(());
    };
    let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let version = line.rsplit(|&b| b == b' ').next().unwrap_or_default();
    match version {
        b"HTTP/1.1" | b"HTTP/1.0" => Ok(()),
        v if v.starts_with(b"HTTP/") => Err(Refusal::new(
            505,
            "version",
            format!(
                "{} is not served here: this server speaks HTTP/1.1 (and 1.0)",
                String::from_utf8_lossy(v)
            ),
        )),
        _ => Err(bad_request("the request line is not `METHOD /path HTTP/1.1`")),
    }
}

fn bad_request(message: impl Into<String>) -> Refusal {
    Refusal::new(400, "bad_request", message)
}

/// Parses and checks a complete head (`buf[..end]`, as found by [`head_end`]).
pub(crate) fn parse_head(buf: &[u8], limits: &HeadLimits) -> Result<Head, Refusal> {
    let mut fields = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut request = httparse::Request::new(&mut fields);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad_request("the request head is incomplete")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(
                431,
                "too_many_headers",
                format!("more than {} header fields", limits.max_headers),
            ))
        }
        Err(httparse::Error::Version) => {
            return Err(Refusal::new(
                505,
                "version",
                "this server speaks HTTP/1.1 (and 1.0)",
            ))
        }
        Err(e) => return Err(bad_request(format!("malformed request head: {e}"))),
    }
    let method = request.method.unwrap_or_default().to_string();
    let target = request.path.unwrap_or_default().to_string();
    let minor = request.version.unwrap_or(1);
    if !target.starts_with('/') {
        return Err(bad_request("the request target must be a path starting with /"));
    }
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut hosts = 0;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut expects_continue = false;
    let mut headers = Vec::with_capacity(request.headers.len());
    for field in request.headers.iter() {
        let name = field.name.to_ascii_lowercase();
        let value = field.value;
        match name.as_str() {
            "content-length" => {
                let text = std::str::from_utf8(value).unwrap_or("");
                // A list of equal values is one length (RFC 9112 6.3); anything else is refused.
                for item in text.split(',') {
                    let item = item.trim();
                    if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(bad_request(format!("invalid Content-Length {text:?}")));
                    }
                    // Digits past what u64 holds are a length too large, not a malformed one.
                    let parsed = item.parse::<u64>().unwrap_or(u64::MAX);
                    if content_length.is_some_and(|known| known != parsed) {
                        return Err(bad_request("conflicting Content-Length values"));
                    }
                    content_length = Some(parsed);
                }
            }
            "transfer-encoding" => transfer_encoding = true,
            "host" => hosts += 1,
            "connection" => {
                for token in std::str::from_utf8(value).unwrap_or("").split(',') {
                    let token = token.trim();
                    connection_close |= token.eq_ignore_ascii_case("close");
                    connection_keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                }
            }
            "expect" => {
                if value.eq_ignore_ascii_case(b"100-continue") {
                    expects_continue = true;
                } else {
                    return Err(Refusal::new(
                        417,
                        "expectation",
                        "only Expect: 100-continue is supported",
                    ));
                }
            }
            _ => {}
        }
        if !HOP_BY_HOP.contains(&name.as_str()) {
            headers.push((field.name.to_string(), value.to_vec()));
        }
    }
    if transfer_encoding && content_length.is_some() {
        return Err(bad_request(
            "Transfer-Encoding and Content-Length together are ambiguous",
        ));
    }
    if transfer_encoding {
        return Err(Refusal::new(
            411,
            "length_required",
            "send the body with a Content-Length (Transfer-Encoding is not accepted)",
        ));
    }
    if minor == 1 && hosts != 1 {
        return Err(bad_request("an HTTP/1.1 request needs exactly one Host header"));
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > limits.max_body_bytes as u64 {
        return Err(Refusal::new(
            413,
            "body_too_large",
            format!("body larger than {} bytes", limits.max_body_bytes),
        ));
    }
    let keep_alive = if minor == 0 {
        connection_keep_alive && !connection_close
    } else {
        !connection_close
    };
    Ok(Head {
        method,
        target,
        headers,
        content_length: content_length as usize,
        expects_continue,
        keep_alive,
    })
}

/// The refusal of a head longer than the limit.
pub(crate) fn head_too_large(limits: &HeadLimits) -> Refusal {
    Refusal::new(
        431,
        "headers_too_large",
        format!(
            "the request head is larger than {} bytes",
            limits.max_header_bytes
        ),
    )
}

/// The refusal of a request that did not arrive within its deadline.
pub(crate) fn too_slow() -> Refusal {
    Refusal::new(
        408,
        "timeout",
        "the request did not arrive in time; send it without pauses",
    )
}

/// The request as tiny_http gets it: HTTP/1.1, the client's fields minus hop-by-hop ones, and
/// the body with its exact length.
pub(crate) fn upstream_request(head: &Head, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &head.headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

/// A response read back from tiny_http, its body de-chunked.
#[derive(Debug)]
pub(crate) struct UpstreamResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Whether the upstream connection can carry another request.
    pub reusable: bool,
}

impl UpstreamResponse {
    /// The response for the client: its own framing, and `Connection: close` when `close`.
    /// `with_body` is false for a HEAD request (the length still says what a GET would get).
    pub fn to_client(&self, close: bool, with_body: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.body.len());
        out.extend_from_slice(
            format!("HTTP/1.1 {} {}\r\n", self.status, reason_phrase(self.status)).as_bytes(),
        );
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        let has_body = !matches!(self.status, 100..=199 | 204 | 304);
        if has_body {
            out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        }
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if has_body && with_body {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// Reads one response from `stream` (tiny_http, which we trust to frame it), up to
/// `max_bytes` of body. `head_only` for the answer to a HEAD request.
pub(crate) fn read_response(
    stream: &mut impl Read,
    max_bytes: usize,
    head_only: bool,
    deadline: Instant,
) -> io::Result<UpstreamResponse> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut buf = Vec::with_capacity(4096);
    let end = loop {
        if let Some(end) = head_end(&buf, 0) {
            break end;
        }
        if buf.len() > 64 * 1024 {
            return Err(invalid("the upstream response head is too large"));
        }
        fill(stream, &mut buf, deadline)?;
    };
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut fields);
    match response.parse(&buf[..end]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(invalid("malformed upstream response")),
    }
    let status = response.code.unwrap_or(502);
    let mut length = None;
    let mut chunked = false;
    let mut close = false;
    let mut headers = Vec::new();
    for field in response.headers.iter() {
        let name = field.name.to_ascii_lowercase();
        match name.as_str() {
            "content-length" => {
                length = std::str::from_utf8(field.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
            }
            "transfer-encoding" => chunked = field.value.eq_ignore_ascii_case(b"chunked"),
            "connection" => close = field.value.eq_ignore_ascii_case(b"close"),
            _ => {}
        }
        if !HOP_BY_HOP.contains(&name.as_str()) {
            headers.push((field.name.to_string(), field.value.to_vec()));
        }
    }
    let mut rest = buf.split_off(end);
    let no_body = head_only || matches!(status, 100..=199 | 204 | 304);
    let body = if no_body {
        Vec::new()
    } else if chunked {
        read_chunked(stream, rest, max_bytes, deadline)?
    } else if let Some(length) = length {
        if length > max_bytes {
            return Err(invalid("the upstream response is too large"));
        }
        while rest.len() < length {
            fill(stream, &mut rest, deadline)?;
        }
        rest.truncate(length);
        rest
    } else {
        // Framed by the end of the connection.
        close = true;
        loop {
            match fill(stream, &mut rest, deadline) {
                Ok(()) if rest.len() <= max_bytes => {}
                Ok(()) => return Err(invalid("the upstream response is too large")),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break rest,
                Err(e) => return Err(e),
            }
        }
    };
    Ok(UpstreamResponse {
        status,
        headers,
        body,
        reusable: !close,
    })
}

/// De-chunks a body whose first bytes are `rest`.
fn read_chunked(
    stream: &mut impl Read,
    mut rest: Vec<u8>,
    max_bytes: usize,
    deadline: Instant,
) -> io::Result<Vec<u8>> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = loop {
            if let Some(i) = rest[at..].iter().position(|&b| b == b'\n') {
                break at + i;
            }
            if rest.len() - at > 1024 {
                return Err(invalid("malformed chunk size"));
            }
            fill(stream, &mut rest, deadline)?;
        };
        let line = std::str::from_utf8(&rest[at..line_end]).map_err(|_| invalid("malformed chunk size"))?;
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| invalid("malformed chunk size"))?;
        at = line_end + 1;
        if size == 0 {
            // Trailers, if any, then the blank line.
            loop {
                if let Some(end) = head_end(&rest[at.saturating_sub(1)..], 0) {
                    let _ = end;
                    return Ok(body);
                }
                if rest.len() - at > 4096 {
                    return Err(invalid("malformed chunked trailer"));
                }
                fill(stream, &mut rest, deadline)?;
            }
        }
        if body.len() + size > max_bytes {
            return Err(invalid("the upstream response is too large"));
        }
        while rest.len() < at + size + 2 {
            fill(stream, &mut rest, deadline)?;
        }
        body.extend_from_slice(&rest[at..at + size]);
        at += size + 2;
    }
}

/// Reads what is available into `buf`; `UnexpectedEof` at the end of the stream, `TimedOut`
/// past `deadline` (the stream must have a read timeout set by the caller).
pub(crate) fn fill(stream: &mut impl Read, buf: &mut Vec<u8>, deadline: Instant) -> io::Result<()> {
    if Instant::now() >= deadline {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
    }
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_header_bytes: 1024,
        max_headers: 8,
        max_body_bytes: 100,
    };

    fn parse(text: &str) -> Result<Head, Refusal> {
        let end = head_end(text.as_bytes(), 0).expect("a complete head");
        check_request_line(text.as_bytes())?;
        parse_head(&text.as_bytes()[..end], &LIMITS)
    }

    fn status(text: &str) -> u16 {
        parse(text).map_or_else(|r| r.status, |_| 200)
    }

    #[test]
    fn a_plain_request_passes_with_its_framing_removed() {
        let head =
            parse("POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n")
                .unwrap();
        assert_eq!(
            (head.method.as_str(), head.target.as_str(), head.content_length),
            ("POST", "/orders", 5)
        );
        assert!(head.keep_alive);
        assert_eq!(head.headers, vec![("Host".to_string(), b"x".to_vec())]);
        assert!(!parse("GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive);
        assert!(
            !parse("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn framing_that_is_ambiguous_or_foreign_is_refused() {
        assert_eq!(status("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 505);
        assert_eq!(check_request_line(b"PRI * HTTP/2.0\r\n").unwrap_err().status, 505);
        assert_eq!(status("GET / HTTP/1.1\r\n\r\n"), 400, "no Host");
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400);
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n"),
            200
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1125899906842624\r\n\r\n"),
            413
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            413
        );
        assert_eq!(status("GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n\r\n"), 417);
        assert_eq!(
            status("GET / HTTP/1.1\r\nHost : x\r\n\r\n"),
            400,
            "space before the colon"
        );
        let many: String = (0..9).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n")), 431);
    }

    #[test]
    fn a_head_ends_at_its_first_empty_line_with_crlf_or_lf() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest", 0), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nrest", 0), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n", 0), None);
        // Searching from a later offset still finds an end that straddles it.
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\n", 17), Some(18));
    }

    #[test]
    fn chunked_and_sized_responses_are_read_back_whole() {
        let deadline = Instant::now() + std::time::Duration::from_secs(1);
        let sized = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nServer: t\r\n\r\nok";
        let r = read_response(&mut &sized[..], 100, false, deadline).unwrap();
        assert_eq!((r.status, r.body.as_slice(), r.reusable), (201, &b"ok"[..], true));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let r = read_response(&mut &chunked[..], 100, false, deadline).unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(
            read_response(&mut &chunked[..], 4, false, deadline).is_err(),
            "over the limit"
        );
        let text = String::from_utf8(r.to_client(true, true)).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\n")
                && text.contains("Content-Length: 5\r\nConnection: close\r\n\r\nabcde"),
            "{text}"
        );
    }
}
