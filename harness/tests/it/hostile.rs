//! The real `txoutbox-server` against hostile clients (issue 9): every attack is measured on
//! the process itself (`/proc/PID/status` threads, `/proc/PID/fd` descriptors) before, during
//! and after, and a normal client must be answered throughout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use txoutbox_testkit::{amqp_url, wait_until, workspace_binary, TestBroker, TestDb};

const HTTP_THREADS: usize = 4;
/// The handlers' connections to tiny_http (2 per handler thread) may stay open once used.
const UPSTREAM: usize = 2 * HTTP_THREADS;

pub(super) struct Server {
    child: Child,
    pub(super) addr: SocketAddr,
    log: std::path::PathBuf,
    pub(super) t: TestDb,
    pub(super) broker: TestBroker,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Server {
    pub(super) fn start(extra: &[(&str, &str)]) -> Server {
        let t = TestDb::new();
        let broker = TestBroker::new();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = std::env::temp_dir().join(format!("txoutbox-hostile-{port}.log"));
        let child = Command::new(workspace_binary("txoutbox-server"))
            .envs(extra.iter().copied())
            .env("DATABASE_URL", &t.url)
            .env("AMQP_URL", amqp_url())
            .env("AMQP_EXCHANGE", &broker.topology.exchange)
            .env("AMQP_QUEUE", &broker.topology.queue)
            .env("HTTP_ADDR", addr.to_string())
            .env("HTTP_THREADS", HTTP_THREADS.to_string())
            .env("RELAY_WORKERS", "1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the server starts");
        let server = Server {
            child,
            addr,
            log,
            t,
            broker,
        };
        wait_until("the server answers /healthz", Duration::from_secs(30), || {
            server.healthz()
        });
        server
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (threads, open descriptors) of the server process.
    pub(super) fn resources(&self) -> (usize, usize) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count();
        (threads, fds)
    }

    /// One GET /healthz on a fresh connection, answered 200 within 2 s.
    pub(super) fn healthz(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request = format!(
            "GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        let mut reply = String::new();
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_to_string(&mut reply).is_ok()
            && reply.starts_with("HTTP/1.1 200")
    }

    /// Waits until threads and descriptors are back to at most `baseline` plus what the
    /// handlers' pool of connections to tiny_http may keep (a thread and two descriptors each).
    pub(super) fn wait_back_to(&self, baseline: (usize, usize), what: &str) {
        let limit = (baseline.0 + UPSTREAM + 2, baseline.1 + 2 * UPSTREAM + 4);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.resources();
            if now.0 <= limit.0 && now.1 <= limit.1 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: threads/descriptors {now:?} did not come back under {limit:?} (baseline {baseline:?})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Sends `bytes`, then reads what comes back until the server closes or 3 s pass.
pub(super) fn exchange(addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = stream.write_all(bytes);
    let mut reply = Vec::new();
    let closed = stream.read_to_end(&mut reply).is_ok();
    (String::from_utf8_lossy(&reply).into_owned(), closed)
}

#[test]
fn http2_prefaces_get_505_and_a_close_and_leak_nothing() {
    let server = Server::start(&[]);
    let baseline = server.resources();
    let (reply, closed) = exchange(server.addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 505"), "{reply:?}");
    assert!(closed, "the connection is closed after the 505");
    let mut peak = baseline;
    for round in 0..6 {
        for _ in 0..100 {
            if let Ok(mut stream) = TcpStream::connect(server.addr) {
                let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            }
        }
        let now = server.resources();
        peak = (peak.0.max(now.0), peak.1.max(now.1));
        assert!(server.healthz(), "round {round}: /healthz during the flood");
    }
    server.wait_back_to(baseline, "after 600 HTTP/2 prefaces");
    assert!(server.healthz());
    eprintln!(
        "http2 prefaces: baseline {baseline:?}, peak {peak:?}, after {:?}",
        server.resources()
    );
}

#[test]
fn lying_content_lengths_get_413_and_park_nothing() {
    let server = Server::start(&[]);
    let baseline = server.resources();
    let head = format!(
        "POST /orders HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 1125899906842624\r\n\r\n0123456789",
        server.addr
    );
    for n in 0..520 {
        let (reply, closed) = exchange(server.addr, head.as_bytes());
        assert!(reply.starts_with("HTTP/1.1 413"), "request {n}: {reply:?}");
        assert!(closed, "request {n}: closed after the 413");
    }
    server.wait_back_to(baseline, "after 520 lying lengths");
    assert!(server.healthz());
}

#[test]
fn slow_uploads_hold_no_handler_and_get_413_or_408() {
    let server = Server::start(&[("HTTP_REQUEST_TIMEOUT", "3")]);
    let baseline = server.resources();
    let mut trickles = Vec::new();
    // Four times the handler threads: declared too large (413 at once), or valid but slower
    // than the request deadline allows (408).
    for n in 0..4 * HTTP_THREADS {
        let declared = if n % 2 == 0 { 900_000_000 } else { 60_000 };
        let mut stream = TcpStream::connect(server.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = format!(
            "POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n{{"
        );
        stream.write_all(head.as_bytes()).unwrap();
        trickles.push((declared, stream));
    }
    let started = Instant::now();
    for _ in 0..10 {
        let asked = Instant::now();
        assert!(server.healthz(), "/healthz while the uploads trickle");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "answered without waiting on them"
        );
        for (_, stream) in &mut trickles {
            let _ = stream.write_all(b" ");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (declared, mut stream) in trickles {
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        let reply = String::from_utf8_lossy(&reply);
        let expected = if declared > 100_000 {
            "HTTP/1.1 413"
        } else {
            "HTTP/1.1 408"
        };
        assert!(reply.starts_with(expected), "declared {declared}: {reply:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the 408s came at the deadline"
    );
    server.wait_back_to(baseline, "after the slow uploads");
}

#[test]
fn past_the_connection_cap_new_connections_are_refused_and_open_ones_keep_working() {
    let server = Server::start(&[("HTTP_MAX_CONNECTIONS", "20")]);
    let baseline = server.resources();
    let mut keep = TcpStream::connect(server.addr).unwrap();
    keep.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut idle: Vec<TcpStream> = (0..19)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    // Each of the 20 is answered once (keep-alive), so each was accepted and holds its slot.
    for stream in idle.iter_mut().chain(std::iter::once(&mut keep)) {
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).unwrap();
        let reply = String::from_utf8_lossy(&buf[..n]);
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    }
    let (reply, closed) = exchange(server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 503") && closed, "{reply:?}");
    assert!(reply.contains("limit"), "{reply:?}");
    let asked = Instant::now();
    let (again, _) = exchange(server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(again.starts_with("HTTP/1.1 503"), "{again:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "refused at once, not queued"
    );
    // Hundreds more: still refused, and the thread count does not follow them.
    let extra: Vec<_> = (0..300)
        .filter_map(|_| TcpStream::connect(server.addr).ok())
        .collect();
    let (threads, _) = server.resources();
    assert!(
        threads <= baseline.0 + 20 + UPSTREAM + 2,
        "threads {threads} with 320 clients"
    );
    drop(extra);
    // An open connection is served at the cap, twice (keep-alive).
    for _ in 0..2 {
        keep.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        let n = keep.read(&mut buf).unwrap();
        let reply = String::from_utf8_lossy(&buf[..n]);
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    }
    idle.clear();
    wait_until("new connections are served again", Duration::from_secs(5), || {
        server.healthz()
    });
    let mut metrics = String::new();
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    stream.read_to_string(&mut metrics).unwrap();
    let refused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("txoutbox_http_connections_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the refusals are counted in /metrics");
    assert!(refused >= 1.0, "{refused}");
}

#[test]
fn bad_framing_is_refused_with_a_close() {
    let server = Server::start(&[]);
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let many: String = (0..101).map(|i| format!("X-{i}: y\r\n")).collect();
    let cases: Vec<(String, &str)> = vec![
        (big, "HTTP/1.1 431"),
        (
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n"),
            "HTTP/1.1 431",
        ),
        (
            "POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}".into(),
            "HTTP/1.1 400",
        ),
        (
            "POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}"
                .into(),
            "HTTP/1.1 400",
        ),
        ("GET /healthz HTTP/3.0\r\nHost: x\r\n\r\n".into(), "HTTP/1.1 505"),
        ("GET /healthz HTTP/1.1\r\n\r\n".into(), "HTTP/1.1 400"),
    ];
    for (request, expected) in cases {
        let (reply, closed) = exchange(server.addr, request.as_bytes());
        assert!(
            reply.starts_with(expected),
            "{:?}: {reply:?}",
            &request[..40.min(request.len())]
        );
        assert!(closed, "closed after {expected}");
    }
    assert!(server.healthz());
}

#[test]
fn an_idle_server_logs_no_warning_or_error() {
    let server = Server::start(&[]);
    // Past the idle timeout (10 s), when tiny_http's accept loop used to fail and log.
    std::thread::sleep(Duration::from_secs(11));
    assert!(server.healthz());
    let log = server.log();
    assert!(
        !log.contains(" ERROR ") && !log.contains(" WARN "),
        "an idle server logged:\n{log}"
    );
}

#[test]
fn an_idle_consumer_and_its_clean_shutdown_log_no_warning_or_error() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let log = std::env::temp_dir().join(format!("txoutbox-idle-consumer-{}.log", std::process::id()));
    let mut child = Command::new(workspace_binary("txoutbox-consumer"))
        .env("DATABASE_URL", &t.url)
        .env("AMQP_URL", amqp_url())
        .env("AMQP_EXCHANGE", &broker.topology.exchange)
        .env("AMQP_QUEUE", &broker.topology.queue)
        .env("CONSUMER_METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("the consumer starts");
    // Past the metrics listener's idle timeout (10 s), when it used to log errors.
    std::thread::sleep(Duration::from_secs(11));
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer did not stop within 15 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(status.success(), "exit status {status}: {text}");
    assert!(
        !text.contains(" ERROR ") && !text.contains(" WARN "),
        "an idle consumer and its shutdown logged:\n{text}"
    );
}
