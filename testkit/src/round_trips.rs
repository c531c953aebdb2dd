//! A proxy in front of the test Postgres that counts round trips: every request a client sends
//! and waits for ends with the server's ReadyForQuery message (`Z`), one per simple query or per
//! `Sync` of the extended protocol, so counting those counts round trips exactly.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

/// Forwards connections to the Postgres of a URL and counts the round trips on all of them.
pub struct RoundTripProxy {
    /// The URL through the proxy (with `sslmode=disable`, so that the proxy can read it).
    pub url: String,
    round_trips: Arc<AtomicU64>,
    stopping: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
}

impl RoundTripProxy {
    /// Starts a proxy to the host and port of `url`.
    pub fn new(url: &str) -> RoundTripProxy {
        let mut through = url::Url::parse(url).expect("a postgres:// URL");
        let upstream = format!(
            "{}:{}",
            through.host_str().unwrap_or("127.0.0.1"),
            through.port().unwrap_or(5432)
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("the proxy binds");
        let addr = listener.local_addr().expect("the proxy's address");
        through.set_host(Some("127.0.0.1")).expect("a host");
        through.set_port(Some(addr.port())).expect("a port");
        let query: Vec<(String, String)> = through
            .query_pairs()
            .filter(|(name, _)| name != "sslmode")
            .map(|(name, value)| (name.into_owned(), value.into_owned()))
            .collect();
        through
            .query_pairs_mut()
            .clear()
            .extend_pairs(query)
            .append_pair("sslmode", "disable");
        let (round_trips, stopping) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (counter, stop) = (round_trips.clone(), stopping.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let (Ok(client), Ok(server)) = (client, TcpStream::connect(&upstream)) else {
                    continue;
                };
                forward(client, server, counter.clone());
            }
        });
        RoundTripProxy {
            url: through.to_string(),
            round_trips,
            stopping,
            addr,
        }
    }

    /// Round trips completed through the proxy so far.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::SeqCst)
    }
}

impl Drop for RoundTripProxy {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies both ways between `client` and `server`, counting the server's `Z` messages.
fn forward(client: TcpStream, server: TcpStream, round_trips: Arc<AtomicU64>) {
    let (Ok(mut client_in), Ok(mut server_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    thread::spawn(move || {
        let _ = io::copy(&mut client_in, &mut server_out);
        let _ = server_out.shutdown(Shutdown::Write);
    });
    thread::spawn(move || {
        let (mut server_in, mut client_out) = (server, client);
        let mut messages = MessageCounter::default();
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let read = match server_in.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            // Counted before the client can see its answer and go on.
            round_trips.fetch_add(messages.ready_for_query_in(&buffer[..read]), Ordering::SeqCst);
            if client_out.write_all(&buffer[..read]).is_err() {
                break;
            }
        }
        let _ = client_out.shutdown(Shutdown::Write);
    });
}

/// Walks the server's message stream (a type byte, then a length that counts itself), however
/// it is cut into reads.
#[derive(Default)]
struct MessageCounter {
    /// Bytes of the current message's header seen so far (type and length).
    header: Vec<u8>,
    /// Bytes of the current message's body still to skip.
    remaining: usize,
}

impl MessageCounter {
    /// How many ReadyForQuery messages start in `bytes`.
    fn ready_for_query_in(&mut self, mut bytes: &[u8]) -> u64 {
        let mut ready = 0;
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let skipped = self.remaining.min(bytes.len());
                self.remaining -= skipped;
                bytes = &bytes[skipped..];
                continue;
            }
            let wanted = (5 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..wanted]);
            bytes = &bytes[wanted..];
            if self.header.len() == 5 {
                if self.header[0] == b'Z' {
                    ready += 1;
                }
                let length =
                    u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                self.remaining = (length as usize).saturating_sub(4);
                self.header.clear();
            }
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_for_query_is_counted_however_the_stream_is_cut() {
        // CommandComplete "SELECT 1", ReadyForQuery 'I', a DataRow holding a 'Z' byte, ReadyForQuery.
        let mut stream = vec![b'C', 0, 0, 0, 13];
        stream.extend_from_slice(b"SELECT 1\0");
        stream.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        stream.extend_from_slice(&[b'D', 0, 0, 0, 11, 0, 1, 0, 0, 0, 1, b'Z']);
        stream.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'T']);
        for cut in 1..stream.len() {
            let mut counter = MessageCounter::default();
            let counted =
                counter.ready_for_query_in(&stream[..cut]) + counter.ready_for_query_in(&stream[cut..]);
            assert_eq!(counted, 2, "cut at {cut}");
        }
    }
}
