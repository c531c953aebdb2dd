//! The gate: the public listening socket, owned by us, in front of tiny_http.
//!
//! tiny_http 0.12 serves every connection on a thread of its own for as long as the client
//! keeps it, reads whatever the client sends with no limit on the head, drains lying bodies on
//! a handler thread, and hangs on requests of other protocols (../shared/stack.md). So no client
//! reaches it. The gate accepts the clients, up to a cap (past it a connection gets 503 and is
//! closed at once); reads each request under a deadline and size limits; refuses bad framing
//! (RFC 9112) with 400/408/411/413/417/431/505 and a close; and passes only complete,
//! well-framed requests on to tiny_http over a private Unix socket, through a pool of a few
//! connections. tiny_http's threads are then bounded by that pool, its handlers never wait on a
//! client, and a client that goes away frees its thread and socket at once.

mod wire;

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use txoutbox::metrics::Registry;
use txoutbox::{Error, Result};

use wire::{HeadLimits, Refusal};

/// Stack of a connection thread: it only moves bytes and parses heads.
const CONNECTION_STACK_BYTES: usize = 256 * 1024;

/// Largest response read back from tiny_http (the status page, metrics and OpenAPI are far
/// below it).
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Statuses after which the gate closes the connection instead of reading another request on
/// it (the client is confused or hostile, and nothing of its body is drained).
const CLOSE_AFTER: [u16; 12] = [400, 401, 404, 405, 408, 411, 413, 415, 417, 431, 501, 505];

/// What the gate allows one client and all of them.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    /// Open client connections at most; past it a new one gets 503 and is closed.
    pub max_connections: usize,
    /// Largest request head (request line and header fields).
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Time from a request's first byte to its last.
    pub request_timeout: Duration,
    /// Time a connection may wait for its next request, or for the client to take a response.
    pub idle_timeout: Duration,
    /// Time a handler has to answer.
    pub handler_timeout: Duration,
    /// Connections to tiny_http at most (its connection threads).
    pub upstream_connections: usize,
}

/// What the gate counts; registered beside the HTTP metrics.
#[derive(Clone, Debug, Default)]
pub(crate) struct GateStats {
    open: Gauge,
    refused: Counter,
    rejected: Family<ReasonLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl GateStats {
    /// Adds `txoutbox_http_open_connections`, `txoutbox_http_connections_refused_total` and
    /// `txoutbox_http_requests_refused_total{reason}` to `registry`.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "txoutbox_http_open_connections",
            "Client connections open now (at most HTTP_MAX_CONNECTIONS)",
            self.open.clone(),
        );
        registry.register(
            "txoutbox_http_connections_refused",
            "Connections refused with 503 at once because HTTP_MAX_CONNECTIONS were open",
            self.refused.clone(),
        );
        registry.register(
            "txoutbox_http_requests_refused",
            "Requests refused before any handler, then closed: reason bad_request, version, \
             headers_too_large, too_many_headers, body_too_large, length_required, expectation, \
             timeout",
            self.rejected.clone(),
        );
    }
}

/// The accepting side: a thread that accepts and a thread per open connection.
pub(crate) struct Gate {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    limits: Limits,
    stats: GateStats,
    upstream: Upstream,
    stopping: AtomicBool,
    /// The open client connections (a handle of each, to shut it down on stop).
    clients: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
}

impl Gate {
    /// Starts accepting on `listener`, passing requests to the tiny_http listening at `upstream`.
    pub(crate) fn start(
        listener: TcpListener,
        upstream: PathBuf,
        limits: Limits,
        stats: GateStats,
    ) -> Result<Gate> {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Other(format!("cannot read the listening address: {e}")))?;
        let shared = Arc::new(Shared {
            upstream: Upstream::new(upstream, limits.upstream_connections),
            limits,
            stats,
            stopping: AtomicBool::new(false),
            clients: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let accepting = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("http-accept".into())
            .spawn(move || accept_loop(&listener, &accepting))
            .map_err(|e| Error::Other(format!("cannot start the HTTP accept thread: {e}")))?;
        Ok(Gate {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The bound address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and ends every connection: those waiting for a request at once, those
    /// with a request in hand once it is answered.
    pub(crate) fn stop(&mut self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the acceptor with a connection of our own.
        let _ = TcpStream::connect_timeout(&wake_address(self.addr), Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for client in self.shared.lock_clients().values() {
            let _ = client.shutdown(Shutdown::Read);
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wake_address(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => SocketAddr::from(([127, 0, 0, 1], a.port())),
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}

impl Shared {
    fn lock_clients(&self) -> std::sync::MutexGuard<'_, HashMap<u64, TcpStream>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    // Logged once per episode of failing accepts, not once per failure.
    let mut failing = false;
    while !shared.stopping.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((stream, _)) => {
                if failing {
                    log::info!("http: accepting connections again");
                    failing = false;
                }
                stream
            }
            // The client gave up before we took it: nothing to do.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                if !failing {
                    log::warn!("http: cannot accept a connection ({e}); retrying every 50 ms");
                    failing = true;
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        admit(stream, shared);
    }
}

/// Starts a connection thread for `stream`, or refuses it at once when the cap is reached.
fn admit(stream: TcpStream, shared: &Arc<Shared>) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let registered = stream.try_clone().ok().and_then(|handle| {
        let mut clients = shared.lock_clients();
        if clients.len() >= shared.limits.max_connections {
            return None;
        }
        clients.insert(id, handle);
        Some(())
    });
    if registered.is_none() {
        refuse_at_cap(stream, shared);
        return;
    }
    shared.stats.open.inc();
    let serving = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("http-conn".into())
        .stack_size(CONNECTION_STACK_BYTES)
        .spawn(move || {
            let _registration = Registration { shared: &serving, id };
            Connection::new(stream, &serving).serve();
        });
    if let Err(e) = spawned {
        // The closure never ran (its stream is closed with it): count the connection out here.
        shared.lock_clients().remove(&id);
        shared.stats.open.dec();
        log::warn!("http: cannot start a connection thread ({e}); the connection is closed");
    }
}

/// Removes a connection from the open ones when its thread ends, however it ends.
struct Registration<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shared.lock_clients().remove(&self.id);
        self.shared.stats.open.dec();
    }
}

/// 503 and a close, without waiting on the client: written only if the socket takes it now.
fn refuse_at_cap(stream: TcpStream, shared: &Shared) {
    shared.stats.refused.inc();
    let refusal = Refusal {
        status: 503,
        reason: "at_capacity",
        message: format!(
            "the server has {} connections open, its limit; retry shortly",
            shared.limits.max_connections
        ),
    };
    let _ = stream.set_nonblocking(true);
    let mut stream = stream;
    let _ = stream.write_all(&refusal.response());
    let _ = stream.shutdown(Shutdown::Both);
}

/// One client connection, served on its own thread.
struct Connection<'a> {
    stream: TcpStream,
    shared: &'a Shared,
    /// Bytes read and not yet used (the start of a pipelined request).
    buf: Vec<u8>,
    head_limits: HeadLimits,
}

/// How reading a request ended without a request.
enum NoRequest {
    /// The client closed, or stayed silent past the idle timeout between requests: close quietly.
    Gone,
    /// Refuse with this and close.
    Refused(Refusal),
}

impl<'a> Connection<'a> {
    fn new(stream: TcpStream, shared: &'a Shared) -> Self {
        let limits = &shared.limits;
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(limits.idle_timeout));
        Connection {
            stream,
            shared,
            buf: Vec::with_capacity(4096),
            head_limits: HeadLimits {
                max_header_bytes: limits.max_header_bytes,
                max_headers: limits.max_headers,
                max_body_bytes: limits.max_body_bytes,
            },
        }
    }

    fn serve(mut self) {
        while !self.shared.stopping.load(Ordering::SeqCst) {
            let (head, body) = match self.read_request() {
                Ok(request) => request,
                Err(NoRequest::Gone) => return,
                Err(NoRequest::Refused(refusal)) => {
                    self.shared
                        .stats
                        .rejected
                        .get_or_create(&ReasonLabel {
                            reason: refusal.reason,
                        })
                        .inc();
                    log::debug!("http: refused a request: {} {}", refusal.status, refusal.message);
                    let _ = self.stream.write_all(&refusal.response());
                    self.linger_and_close();
                    return;
                }
            };
            let response = self.shared.upstream.exchange(&head, &body, &self.shared.limits);
            let (bytes, close) = match response {
                Ok(response) => {
                    let close = !head.keep_alive
                        || CLOSE_AFTER.contains(&response.status)
                        || self.shared.stopping.load(Ordering::SeqCst);
                    (response.to_client(close, head.method != "HEAD"), close)
                }
                Err(e) => {
                    log::warn!(
                        "http: the handlers did not answer {} {}: {e}",
                        head.method,
                        head.target
                    );
                    let refusal = Refusal {
                        status: 503,
                        reason: "unavailable",
                        message: "the server could not answer in time; retry later".into(),
                    };
                    (refusal.response(), true)
                }
            };
            if self.stream.write_all(&bytes).is_err() || close {
                self.linger_and_close();
                return;
            }
        }
    }

    /// Closes after a refusal or the last response without losing it: a close with unread
    /// input would send the client a reset, which can discard the response it has not read.
    fn linger_and_close(&mut self) {
        let _ = self.stream.flush();
        let _ = self.stream.shutdown(Shutdown::Write);
        let _ = self.stream.set_read_timeout(Some(Duration::from_millis(200)));
        let mut sink = [0u8; 4096];
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            match io::Read::read(&mut self.stream, &mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Reads one request: its head under the limits, then its body, all within the request
    /// deadline counted from its first byte.
    fn read_request(&mut self) -> Result<(wire::Head, Vec<u8>), NoRequest> {
        let limits = &self.shared.limits;
        let idle_until = Instant::now() + limits.idle_timeout;
        let mut started: Option<Instant> = (!self.buf.is_empty()).then(Instant::now);
        let mut line_checked = false;
        let mut searched = 0;
        let end = loop {
            if !self.buf.is_empty() {
                if !line_checked && self.buf.contains(&b'\n') {
                    wire::check_request_line(&self.buf).map_err(NoRequest::Refused)?;
                    line_checked = true;
                }
                if let Some(end) = wire::head_end(&self.buf, searched) {
                    break end;
                }
                searched = self.buf.len();
                if self.buf.len() > limits.max_header_bytes {
                    return Err(NoRequest::Refused(wire::head_too_large(&self.head_limits)));
                }
            }
            let deadline = started.map_or(idle_until, |at| at + limits.request_timeout);
            match self.read_more(deadline) {
                Ok(()) => {
                    started.get_or_insert_with(Instant::now);
                }
                Err(e) if started.is_none() || e.kind() != io::ErrorKind::TimedOut => {
                    return Err(NoRequest::Gone)
                }
                Err(_) => return Err(NoRequest::Refused(wire::too_slow())),
            }
        };
        if end > limits.max_header_bytes {
            return Err(NoRequest::Refused(wire::head_too_large(&self.head_limits)));
        }
        let head = wire::parse_head(&self.buf[..end], &self.head_limits).map_err(NoRequest::Refused)?;
        let started = started.unwrap_or_else(Instant::now);
        self.buf.drain(..end);
        if head.expects_continue && self.buf.len() < head.content_length {
            let _ = self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let deadline = started + limits.request_timeout;
        while self.buf.len() < head.content_length {
            match self.read_more(deadline) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(NoRequest::Refused(wire::too_slow()))
                }
                Err(_) => return Err(NoRequest::Gone),
            }
        }
        let body: Vec<u8> = self.buf.drain(..head.content_length).collect();
        Ok((head, body))
    }

    fn read_more(&mut self, deadline: Instant) -> io::Result<()> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        self.stream.set_read_timeout(Some(remaining))?;
        wire::fill(&mut self.stream, &mut self.buf, deadline)
    }
}

/// The pool of connections to tiny_http's Unix socket.
struct Upstream {
    path: PathBuf,
    max: usize,
    state: Mutex<UpstreamState>,
    returned: Condvar,
}

struct UpstreamState {
    idle: Vec<UnixStream>,
    open: usize,
    /// Threads waiting in [`Upstream::checkout`] for a connection to come back.
    waiting: usize,
}

impl Upstream {
    fn new(path: PathBuf, max: usize) -> Upstream {
        Upstream {
            path,
            max: max.max(1),
            state: Mutex::new(UpstreamState {
                idle: Vec::new(),
                open: 0,
                waiting: 0,
            }),
            returned: Condvar::new(),
        }
    }

    /// Sends the request to a handler and reads its response, within `handler_timeout`.
    fn exchange(
        &self,
        head: &wire::Head,
        body: &[u8],
        limits: &Limits,
    ) -> io::Result<wire::UpstreamResponse> {
        let deadline = Instant::now() + limits.handler_timeout;
        let mut stream = self.checkout(deadline, limits.handler_timeout)?;
        let outcome = (|| {
            stream.write_all(&wire::upstream_request(head, body))?;
            wire::read_response(&mut stream, MAX_RESPONSE_BYTES, head.method == "HEAD", deadline)
        })();
        self.give_back(stream, outcome.as_ref().is_ok_and(|r| r.reusable));
        outcome
    }

    /// An idle handler connection, or a new one (whose reads and writes time out after
    /// `timeout`, set once here rather than per request), waiting until `deadline` for one to
    /// come back when `max` are open.
    fn checkout(&self, deadline: Instant, timeout: Duration) -> io::Result<UnixStream> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(stream) = state.idle.pop() {
                return Ok(stream);
            }
            if state.open < self.max {
                state.open += 1;
                drop(state);
                let connected = UnixStream::connect(&self.path).and_then(|stream| {
                    stream.set_read_timeout(Some(timeout))?;
                    stream.set_write_timeout(Some(timeout))?;
                    Ok(stream)
                });
                return connected.inspect_err(|_| {
                    let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    state.open -= 1;
                    self.wake_a_waiter(&state);
                });
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "every handler connection is busy",
                ));
            }
            state.waiting += 1;
            state = self
                .returned
                .wait_timeout(state, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            state.waiting -= 1;
        }
    }

    fn give_back(&self, stream: UnixStream, reusable: bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if reusable {
            state.idle.push(stream);
        } else {
            state.open -= 1;
        }
        self.wake_a_waiter(&state);
    }

    /// Wakes one thread waiting for a connection, if any (a wake-up nobody waits for is a
    /// futex call per request).
    fn wake_a_waiter(&self, state: &UpstreamState) {
        if state.waiting > 0 {
            self.returned.notify_one();
        }
    }
}
