//! Hostile HTTP clients for the hostile-clients case: each attack of issue 9 in turn, on
//! threads of its own, against the real server while the normal load runs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Idle connections one attacker holds (past the server's default cap of 256).
const HOARD: usize = 300;

/// One attacker's loop: runs against the address until the flag is set.
type AttackFn = fn(SocketAddr, &AtomicBool, &Tally);

/// What the attackers did, for the report.
#[derive(Debug, Default)]
pub struct Tally {
    /// Connections opened by all attackers.
    pub connections: AtomicU64,
    /// Answers by status class of interest: 4xx/5xx refusals seen by attackers.
    pub refusals: AtomicU64,
}

/// Running attackers; [`stop`](Self::stop) ends them and closes every connection they hold.
pub struct Attack {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// What they did.
    pub tally: Arc<Tally>,
}

impl Attack {
    /// Starts one thread per attack against `addr`.
    pub fn start(addr: SocketAddr) -> Attack {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let attacks: [(&str, AttackFn); 5] = [
            ("prefaces", prefaces),
            ("lying-lengths", lying_lengths),
            ("slow-uploads", slow_uploads),
            ("big-heads", big_heads),
            ("hoard", hoard),
        ];
        let threads = attacks
            .into_iter()
            .filter_map(|(name, attack)| {
                let (stop, tally) = (stop.clone(), tally.clone());
                std::thread::Builder::new()
                    .name(format!("attack-{name}"))
                    .spawn(move || attack(addr, &stop, &tally))
                    .ok()
            })
            .collect();
        Attack { stop, threads, tally }
    }

    /// Stops every attacker and waits for them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

fn connect(addr: SocketAddr, tally: &Tally) -> Option<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    tally.connections.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    Some(stream)
}

/// Sends `bytes` and reads the answer's status, counting a refusal.
fn send(addr: SocketAddr, tally: &Tally, bytes: &[u8]) {
    let Some(mut stream) = connect(addr, tally) else {
        return;
    };
    if stream.write_all(bytes).is_err() {
        return;
    }
    let mut head = [0u8; 12];
    if stream.read_exact(&mut head).is_ok() && matches!(head[9], b'4' | b'5') {
        tally.refusals.fetch_add(1, Ordering::Relaxed);
    }
}

/// HTTP/2 prior-knowledge prefaces, sent and closed at once.
fn prefaces(addr: SocketAddr, stop: &AtomicBool, tally: &Tally) {
    while !stop.load(Ordering::Relaxed) {
        if let Some(mut stream) = connect(addr, tally) {
            let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Requests that declare a petabyte body, send ten bytes and read the answer.
fn lying_lengths(addr: SocketAddr, stop: &AtomicBool, tally: &Tally) {
    let request = b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                    Content-Length: 1125899906842624\r\n\r\n0123456789";
    while !stop.load(Ordering::Relaxed) {
        send(addr, tally, request);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sixteen uploads at a time that trickle a byte every 500 ms (valid length, too slow).
fn slow_uploads(addr: SocketAddr, stop: &AtomicBool, tally: &Tally) {
    let mut streams: Vec<TcpStream> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        while streams.len() < 16 {
            let Some(mut stream) = connect(addr, tally) else {
                break;
            };
            let head = b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                         Content-Length: 60000\r\n\r\n{";
            if stream.write_all(head).is_ok() {
                streams.push(stream);
            }
        }
        streams.retain_mut(|stream| stream.write_all(b" ").is_ok());
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Heads of 40 KiB and of 200 fields.
fn big_heads(addr: SocketAddr, stop: &AtomicBool, tally: &Tally) {
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let fields: String = (0..200).map(|i| format!("X-{i}: y\r\n")).collect();
    let many = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{fields}\r\n");
    while !stop.load(Ordering::Relaxed) {
        send(addr, tally, big.as_bytes());
        send(addr, tally, many.as_bytes());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Idle connections, as many as the server takes and more, renewed as they are closed.
fn hoard(addr: SocketAddr, stop: &AtomicBool, tally: &Tally) {
    let mut held: Vec<TcpStream> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        while held.len() < HOARD {
            match connect(addr, tally) {
                Some(stream) => held.push(stream),
                None => break,
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        // A refused or timed-out connection has been closed by the server: let it go.
        held.retain(|stream| {
            let _ = stream.set_nonblocking(true);
            let mut byte = [0u8; 1];
            let alive =
                matches!((&*stream).read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            let _ = stream.set_nonblocking(false);
            alive
        });
    }
}
