//! The tiny_http front: the listening socket and what it takes to keep tiny_http 0.12 serving
//! under hostile or unlucky conditions its own code does not handle (see ../shared/stack.md):
//! an accept loop that dies on its first error or panics when a descriptor runs out, a
//! connection pool that can strand a new connection, and a request drop that aborts the
//! process on an absurd `Content-Length`.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tiny_http::{Request, Response, Server};

use txoutbox::{Error, Result};

/// How often the kicker opens and closes a connection to the server.
const KICK_INTERVAL: Duration = Duration::from_millis(25);

/// How often a listener without kicks checks for a tiny_http panic.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Pause before rebuilding a server whose accept loop died (e.g. out of file descriptors).
const RESTART_PAUSE: Duration = Duration::from_millis(100);

/// Declared bodies above this are never drained (see [`answer_without_draining`]).
const UNDRAINABLE_BODY_BYTES: usize = 1 << 30;

/// Requests answered without draining their body so far (each parks one connection thread).
static UNDRAINED: AtomicUsize = AtomicUsize::new(0);

/// Panics raised inside tiny_http's code so far (see [`watch_tiny_http_panics`]).
static TINY_HTTP_PANICS: AtomicUsize = AtomicUsize::new(0);

/// The server currently accepting, shared by the request threads and the kicker.
type CurrentServer = Arc<RwLock<Arc<Server>>>;

/// The listening socket and the tiny_http server currently accepting on it.
pub(crate) struct Front {
    /// Our own handle on the socket: it outlives a tiny_http accept loop that died, so a new
    /// server can take over the same port with no gap in which it is closed.
    listener: TcpListener,
    addr: SocketAddr,
    current: CurrentServer,
    stopping: AtomicBool,
    kicker_stop: Arc<AtomicBool>,
    kicker: Mutex<Option<JoinHandle<()>>>,
}

impl Front {
    /// Binds `addr` (the value of the setting named `setting`, for errors) and starts accepting.
    /// A connection silent for `idle_timeout` while the server reads from it (or that takes no
    /// data for as long while it writes) fails its I/O.
    pub(crate) fn bind(setting: &str, addr: &str, idle_timeout: Duration) -> Result<Front> {
        Self::bind_with(setting, addr, idle_timeout, true)
    }

    /// Like [`bind`](Self::bind) without the kicker's connections (see [`start_kicker`]), for a
    /// listener with a few sequential clients, such as a metrics scraper: it saves 40
    /// connections a second.
    pub(crate) fn bind_unkicked(setting: &str, addr: &str, idle_timeout: Duration) -> Result<Front> {
        Self::bind_with(setting, addr, idle_timeout, false)
    }

    fn bind_with(setting: &str, addr: &str, idle_timeout: Duration, kick: bool) -> Result<Front> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::Config(format!("cannot listen on {setting} {addr}: {e}")))?;
        set_connection_timeouts(&listener, idle_timeout)?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::Config(format!("cannot read the address of {setting} {addr}: {e}")))?;
        watch_tiny_http_panics();
        let current = Arc::new(RwLock::new(Arc::new(new_server(&listener)?)));
        let kicker_stop = Arc::new(AtomicBool::new(false));
        let kicker = start_kicker(local, current.clone(), kicker_stop.clone(), kick)?;
        Ok(Front {
            listener,
            addr: local,
            current,
            stopping: AtomicBool::new(false),
            kicker_stop,
            kicker: Mutex::new(Some(kicker)),
        })
    }

    /// The bound address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next request, or `None` once [`stop`](Self::stop) was called. Replaces the tiny_http
    /// server when its accept loop has ended.
    pub(crate) fn next_request(&self) -> Option<Request> {
        loop {
            let server = self.server();
            match server.recv() {
                Ok(request) => return Some(request),
                Err(_) if self.stopping.load(Ordering::SeqCst) => return None,
                Err(e) => self.replace(&server, &e),
            }
        }
    }

    /// Stops accepting and releases the `handlers` threads waiting in
    /// [`next_request`](Self::next_request).
    pub(crate) fn stop(&self, handlers: usize) {
        self.stopping.store(true, Ordering::SeqCst);
        let server = self.server();
        // Each unblock() queues one wake-up for one thread in recv().
        for _ in 0..handlers {
            server.unblock();
        }
        self.kicker_stop.store(true, Ordering::Relaxed);
        if let Some(kicker) = self.kicker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = kicker.join();
        }
    }

    fn server(&self) -> Arc<Server> {
        current_server(&self.current)
    }

    /// tiny_http's accept loop ends for good on its first accept error (ECONNABORTED, EMFILE):
    /// start a new server on our handle of the same socket, unless another thread already did.
    fn replace(&self, failed: &Arc<Server>, error: &std::io::Error) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&current, failed) {
            return;
        }
        log::error!("http: the accept loop stopped ({error}); starting a new one on the same socket");
        let mut failures = 0u32;
        let server = loop {
            std::thread::sleep(RESTART_PAUSE);
            match new_server(&self.listener) {
                Ok(server) => break server,
                Err(_) if self.stopping.load(Ordering::SeqCst) => return,
                Err(e) => {
                    if failures == 0 {
                        log::error!("http: cannot restart the accept loop yet: {e}; retrying");
                    }
                    failures += 1;
                }
            }
        };
        log::info!("http: accepting again");
        *current = Arc::new(server);
        // Threads still waiting on the dead server must move to the new one.
        for _ in 0..1024 {
            failed.unblock();
        }
    }
}

/// Works around a race in tiny_http 0.12's connection thread pool.
///
/// tiny_http serves each connection on a pooled thread for as long as the connection lives.
/// During a burst of new connections its pool can count a thread as idle while that thread is
/// already taking another connection, and so queue a new connection without starting a thread
/// for it; the queued connection then waits until some other connection closes, which
/// keep-alive clients may never do. A connection that closes at once ends its task and lets
/// the pool pick up whatever is queued, so a thread makes one every [`KICK_INTERVAL`].
///
/// The same thread notices a panic in tiny_http's code (its accept thread dies that way when
/// a descriptor runs out between `accept` and cloning the socket, and then says nothing) and
/// wakes a request thread, which sees the error and starts a new server on the same socket.
/// Without `kick` it only watches, every [`WATCH_INTERVAL`].
fn start_kicker(
    addr: SocketAddr,
    current: CurrentServer,
    stop: Arc<AtomicBool>,
    kick: bool,
) -> Result<JoinHandle<()>> {
    let target = match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => SocketAddr::from(([127, 0, 0, 1], a.port())),
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    };
    std::thread::Builder::new()
        .name("http-kicker".into())
        .spawn(move || {
            let mut panics_seen = TINY_HTTP_PANICS.load(Ordering::SeqCst);
            while !stop.load(Ordering::Relaxed) {
                let panics = TINY_HTTP_PANICS.load(Ordering::SeqCst);
                if panics != panics_seen {
                    panics_seen = panics;
                    log::error!("http: tiny_http panicked; restarting its accept loop in case it died");
                    current_server(&current).unblock();
                }
                if !kick {
                    std::thread::sleep(WATCH_INTERVAL);
                    continue;
                }
                if let Ok(stream) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                    drop(stream);
                }
                std::thread::sleep(KICK_INTERVAL);
            }
        })
        .map_err(|e| Error::Other(format!("cannot start an HTTP thread: {e}")))
}

/// Sets the read and write timeouts on the listening socket, from which Linux copies them to
/// every accepted connection: tiny_http gives no access to a connection's socket, and without
/// a timeout a client that stops sending mid-body holds a handler thread for good.
fn set_connection_timeouts(listener: &TcpListener, timeout: Duration) -> Result<()> {
    let socket = socket2::SockRef::from(listener);
    socket
        .set_read_timeout(Some(timeout))
        .and_then(|()| socket.set_write_timeout(Some(timeout)))
        .map_err(|e| Error::Other(format!("cannot set timeouts on the HTTP socket: {e}")))
}

fn current_server(current: &CurrentServer) -> Arc<Server> {
    current.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Counts panics raised in tiny_http's own source files, then lets the previous hook report
/// them as usual. tiny_http 0.12's accept thread unwraps a socket clone that fails when the
/// process is out of descriptors: the thread dies and the server never accepts again, with no
/// error reaching [`Server::recv`]. The count is how the kicker learns of it.
fn watch_tiny_http_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.location().is_some_and(|l| l.file().contains("tiny_http")) {
                TINY_HTTP_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

fn new_server(listener: &TcpListener) -> Result<Server> {
    let clone = listener
        .try_clone()
        .map_err(|e| Error::Other(format!("cannot share the HTTP socket: {e}")))?;
    Server::from_listener(clone, None).map_err(|e| Error::Other(format!("cannot start the HTTP server: {e}")))
}

/// True when the request declares a body too large to let tiny_http drain.
pub(crate) fn is_undrainable(request: &Request) -> bool {
    request
        .body_length()
        .is_some_and(|len| len > UNDRAINABLE_BODY_BYTES)
}

/// Answers a request whose declared body is absurdly large, without letting tiny_http drain it.
///
/// Dropping a tiny_http 0.12 request allocates a buffer as large as the unread part of the
/// declared body to drain it, and an allocation of, say, 2^50 bytes aborts the whole process.
/// The only way around that in its public API is to take the connection's streams out of the
/// request (`upgrade`) and never drop them. That keeps one connection thread and socket
/// parked for good per such request: a bounded cost an attacker pays per request, instead of
/// the process. A reverse proxy with a body limit in front avoids even that (docs/operating.md).
pub(crate) fn answer_without_draining(request: Request, response: Response<std::io::Cursor<Vec<u8>>>) {
    let count = UNDRAINED.fetch_add(1, Ordering::Relaxed) + 1;
    log::warn!(
        "http: request from {:?} declares a {} byte body; answered without draining \
         (connection parked, {count} so far)",
        request.remote_addr(),
        request.body_length().unwrap_or(0)
    );
    let mut stream = request.upgrade("close", response);
    let _ = stream.flush();
    std::mem::forget(stream);
}
