//! The front: the gate that owns the public socket (see [`crate::gate`]) and the tiny_http
//! server behind it on a private Unix socket, with what it takes to keep tiny_http 0.12
//! serving (see ../shared/stack.md): an accept loop that dies on its first error or panics when
//! a descriptor runs out, and a connection pool that can strand a new connection.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tiny_http::{Request, Server};

use crate::gate::{Gate, GateStats, Limits};
use txoutbox::{Error, Result};

/// How often the kicker opens and closes a connection to tiny_http.
const KICK_INTERVAL: Duration = Duration::from_millis(25);

/// How often a listener without kicks checks for a tiny_http panic.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Pause before rebuilding a server whose accept loop died (e.g. out of file descriptors).
const RESTART_PAUSE: Duration = Duration::from_millis(100);

/// Panics raised inside tiny_http's code so far (see [`watch_tiny_http_panics`]).
static TINY_HTTP_PANICS: AtomicUsize = AtomicUsize::new(0);

/// The server currently accepting, shared by the request threads and the kicker.
type CurrentServer = Arc<RwLock<Arc<Server>>>;

/// The gate on the public socket and the tiny_http server currently accepting behind it.
pub(crate) struct Front {
    addr: SocketAddr,
    gate: Mutex<Gate>,
    /// Our own handle on tiny_http's socket: it outlives a tiny_http accept loop that died, so
    /// a new server can take over with no gap.
    listener: UnixListener,
    /// Removed (with its directory) when the front is dropped.
    _socket: PrivateSocket,
    current: CurrentServer,
    stopping: AtomicBool,
    kicker_stop: Arc<AtomicBool>,
    kicker: Mutex<Option<JoinHandle<()>>>,
}

impl Front {
    /// Binds `addr` (the value of the setting named `setting`, for errors) and starts the gate
    /// in front of a tiny_http server on a private Unix socket. With `kick`, a thread keeps
    /// tiny_http's connection pool from stranding a new connection (see [`start_kicker`]); a
    /// listener with a few sequential clients, such as a metrics scraper, does without.
    pub(crate) fn bind(
        setting: &str,
        addr: &str,
        limits: Limits,
        stats: GateStats,
        kick: bool,
    ) -> Result<Front> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::Config(format!("cannot listen on {setting} {addr}: {e}")))?;
        let socket = PrivateSocket::new()?;
        let upstream = UnixListener::bind(socket.path())
            .map_err(|e| Error::Other(format!("cannot listen on {}: {e}", socket.path().display())))?;
        watch_tiny_http_panics();
        let current = Arc::new(RwLock::new(Arc::new(new_server(&upstream)?)));
        let kicker_stop = Arc::new(AtomicBool::new(false));
        let kicker = start_kicker(
            socket.path().to_path_buf(),
            current.clone(),
            kicker_stop.clone(),
            kick,
        )?;
        let gate = Gate::start(listener, socket.path().to_path_buf(), limits, stats)?;
        Ok(Front {
            addr: gate.addr(),
            gate: Mutex::new(gate),
            listener: upstream,
            _socket: socket,
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
        self.gate.lock().unwrap_or_else(|p| p.into_inner()).stop();
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
    target: PathBuf,
    current: CurrentServer,
    stop: Arc<AtomicBool>,
    kick: bool,
) -> Result<JoinHandle<()>> {
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
                if let Ok(stream) = UnixStream::connect(&target) {
                    drop(stream);
                }
                std::thread::sleep(KICK_INTERVAL);
            }
        })
        .map_err(|e| Error::Other(format!("cannot start an HTTP thread: {e}")))
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

fn new_server(listener: &UnixListener) -> Result<Server> {
    let clone = listener
        .try_clone()
        .map_err(|e| Error::Other(format!("cannot share the HTTP socket: {e}")))?;
    Server::from_listener(clone, None).map_err(|e| Error::Other(format!("cannot start the HTTP server: {e}")))
}

/// A Unix socket path in a directory only this user may enter, so that nobody reaches
/// tiny_http except through the gate. Both are removed when dropped.
pub(crate) struct PrivateSocket {
    dir: PathBuf,
    path: PathBuf,
}

impl PrivateSocket {
    fn new() -> Result<PrivateSocket> {
        use std::os::unix::fs::DirBuilderExt;
        static SEQUENCE: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "txoutbox-http-{}-{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::Other(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("http.sock");
        Ok(PrivateSocket { dir, path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}
