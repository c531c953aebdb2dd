//! `deploy/nginx.conf` in front of the real server: the hostile-client attacks through it are
//! answered by nginx, and the server behind it sees none of them.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use txoutbox_testkit::wait_until;

use crate::hostile::{exchange, Server};

/// nginx with the shipped configuration, pointed at `upstream`; stopped when dropped.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    prefix: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.prefix);
    }
}

impl Nginx {
    fn start(upstream: SocketAddr) -> Nginx {
        let binary = std::env::var("NGINX").unwrap_or_else(|_| "nginx".into());
        let found = Command::new(&binary)
            .arg("-v")
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "nginx is needed for this test and `{binary}` does not run: install it with \
             `apt-get install -y nginx-light` (Debian; CI's .ci/run does), or point NGINX at a binary"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nginx.conf"))
            .expect("deploy/nginx.conf");
        let config = shipped
            .replace("server 127.0.0.1:8080;", &format!("server {upstream};"))
            .replace("listen 127.0.0.1:8088;", &format!("listen {addr};"))
            // The test runs as whoever runs it; nginx as root would switch its workers to nobody.
            .replace("worker_processes 1;", "worker_processes 1;\nuser root;");
        let prefix = std::env::temp_dir().join(format!("txoutbox-nginx-{port}"));
        std::fs::create_dir_all(&prefix).unwrap();
        std::fs::write(prefix.join("nginx.conf"), config).unwrap();
        let child = Command::new(&binary)
            .arg("-p")
            .arg(&prefix)
            .args(["-c", "nginx.conf", "-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let nginx = Nginx { child, addr, prefix };
        wait_until("nginx listens", Duration::from_secs(10), || {
            TcpStream::connect(addr).is_ok()
        });
        nginx
    }
}

#[test]
fn the_shipped_nginx_config_answers_the_attacks_and_the_server_sees_none() {
    let server = Server::start(&[]);
    let nginx = Nginx::start(server.addr);
    let (reply, _) = exchange(
        nginx.addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "through nginx: {reply:?}");
    let baseline = server.resources();

    let (reply, closed) = exchange(nginx.addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    assert!(
        reply.starts_with("HTTP/1.1 400") || reply.is_empty(),
        "preface: {reply:?}"
    );
    assert!(closed, "the preface connection is closed");
    let (reply, _) = exchange(
        nginx.addr,
        b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1125899906842624\r\n\r\n0123456789",
    );
    assert!(reply.starts_with("HTTP/1.1 413"), "lying length: {reply:?}");
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let (reply, _) = exchange(nginx.addr, big.as_bytes());
    assert!(
        reply.starts_with("HTTP/1.1 400") || reply.starts_with("HTTP/1.1 494"),
        "big head: {reply:?}"
    );

    // Slow uploads wait in nginx: the server gets no connection for them.
    let mut trickles: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut stream = TcpStream::connect(nginx.addr).unwrap();
            stream
                .write_all(b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n{")
                .unwrap();
            stream
        })
        .collect();
    for _ in 0..5 {
        for stream in &mut trickles {
            let _ = stream.write_all(b" ");
        }
        assert!(server.healthz(), "the server answers directly meanwhile");
        std::thread::sleep(Duration::from_millis(200));
    }
    let during = server.resources();
    assert!(
        during.0 <= baseline.0 + 2,
        "the server got threads for uploads nginx should hold: {baseline:?} -> {during:?}"
    );
    drop(trickles);
    server.wait_back_to(baseline, "after the attacks through nginx");
}
