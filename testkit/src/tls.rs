//! TLS for the tests: a CA of their own, and a RabbitMQ TLS listener using it, started on the
//! running broker (no restart, nothing in rabbitmq.conf).
//!
//! The certificates live in one fixed directory (`/tmp/txoutbox-test-tls`, or
//! `TXOUTBOX_TEST_TLS_DIR`), made once with the `openssl` CLI and moved into place whole; a
//! lock file serializes the test processes that race to make it or to start the listener.
//! The listener (`127.0.0.1:5671`, or `TXOUTBOX_TEST_AMQPS_PORT`) is started with
//! `rabbitmqctl eval 'rabbit_networking:start_ssl_listener(...)'`: it lasts until the broker
//! restarts, and the next test that finds it gone starts it again. One already listening with
//! this CA is reused. Everything here is for tests only: the keys are world-readable (the
//! broker runs as its own user).

use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The directory of the tests' CA (`ca.pem`), the broker's certificate signed by it
/// (`server.pem`, `server.key`; SAN localhost and 127.0.0.1), and an unrelated CA
/// (`other-ca.pem`) for the tests of a wrong CA.
pub fn tls_dir() -> PathBuf {
    std::env::var_os("TXOUTBOX_TEST_TLS_DIR")
        .map_or_else(|| PathBuf::from("/tmp/txoutbox-test-tls"), PathBuf::from)
}

/// Port of the tests' RabbitMQ TLS listener.
pub fn amqps_port() -> u16 {
    std::env::var("TXOUTBOX_TEST_AMQPS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5671)
}

/// The tests' CA certificate (made on first use).
pub fn ca_file() -> PathBuf {
    certificates().join("ca.pem")
}

/// A CA that signed nothing the tests' servers present (made on first use).
pub fn other_ca_file() -> PathBuf {
    certificates().join("other-ca.pem")
}

/// Holds the tests' TLS lock (a file lock: it also serializes other test processes).
struct Lock(#[allow(dead_code)] File);

fn lock() -> Lock {
    let dir = tls_dir();
    let path = dir.with_extension("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open the TLS test lock {}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("cannot take the TLS test lock {}: {e}", path.display()));
    Lock(file)
}

/// Makes the certificate directory once (under the lock, built aside and renamed into place).
fn certificates() -> PathBuf {
    let dir = tls_dir();
    if dir.join("complete").exists() {
        return dir;
    }
    let _lock = lock();
    if dir.join("complete").exists() {
        return dir;
    }
    let building = dir.with_extension(format!("building.{}", std::process::id()));
    let _ = fs::remove_dir_all(&building);
    fs::create_dir_all(&building).expect("cannot create the TLS test directory");
    make_certificates(&building);
    fs::write(building.join("complete"), b"").expect("cannot write the TLS test directory");
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&building, &dir).expect("cannot move the TLS test directory into place");
    dir
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the TLS tests need the openssl CLI (apt-get install openssl)");
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn make_certificates(dir: &Path) {
    for (name, cn) in [("ca", "txoutbox test CA"), ("other-ca", "txoutbox unrelated CA")] {
        let (key, pem, subject) = (format!("{name}.key"), format!("{name}.pem"), format!("/CN={cn}"));
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "3650",
                "-keyout",
                &key,
                "-out",
                &pem,
                "-subj",
                &subject,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("cannot write server.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-out",
            "server.pem",
            "-extfile",
            "server.ext",
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    for entry in fs::read_dir(dir).expect("read_dir").flatten() {
        fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o644)).expect("chmod");
    }
}

/// True when a TLS server on `port` presents a certificate for localhost signed by `ca`.
fn listener_uses(port: u16, ca: &Path) -> bool {
    let Ok(pem) = fs::read(ca) else { return false };
    let Ok(cert) = native_tls::Certificate::from_pem(&pem) else {
        return false;
    };
    let Ok(connector) = native_tls::TlsConnector::builder()
        .disable_built_in_roots(true)
        .add_root_certificate(cert)
        .build()
    else {
        return false;
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(3)));
    connector.connect("localhost", stream).is_ok()
}

/// Starts the broker's TLS listener with the tests' CA, replacing one on the same port.
fn start_listener(dir: &Path, port: u16) {
    let file = |name: &str| dir.join(name).display().to_string();
    // The PEM cache is cleared: a new CA at the same path must not be served from the old.
    let expression = format!(
        "ssl:clear_pem_cache(), \
         catch rabbit_networking:stop_tcp_listener({{\"127.0.0.1\", {port}}}), \
         rabbit_networking:start_ssl_listener({{\"127.0.0.1\", {port}}}, \
           [{{cacertfile, \"{}\"}}, {{certfile, \"{}\"}}, {{keyfile, \"{}\"}}, \
            {{verify, verify_none}}, {{fail_if_no_peer_cert, false}}], 1).",
        file("ca.pem"),
        file("server.pem"),
        file("server.key"),
    );
    let output = Command::new("rabbitmqctl")
        .args(["eval", &expression])
        .output()
        .expect("the amqps tests need rabbitmqctl");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.trim() == "ok",
        "cannot start RabbitMQ's TLS listener on port {port} (rabbitmqctl eval {expression:?}): {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An `amqps://` URL of the test broker's TLS listener (the credentials and virtual host of
/// [`amqp_url`](crate::amqp_url)), trusting the tests' CA; starts the listener when needed.
pub fn rabbitmq_tls_url() -> String {
    let dir = certificates();
    let port = amqps_port();
    let ca = dir.join("ca.pem");
    if !listener_uses(port, &ca) {
        let _lock = lock();
        if !listener_uses(port, &ca) {
            start_listener(&dir, port);
            let deadline = Instant::now() + Duration::from_secs(15);
            while !listener_uses(port, &ca) {
                assert!(
                    Instant::now() < deadline,
                    "RabbitMQ's TLS listener on port {port} started but does not present the tests' certificate"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    amqps_url(port, &ca)
}

/// [`amqp_url`](crate::amqp_url) turned into `amqps://localhost:PORT` with `cacertfile=CA`.
pub fn amqps_url(port: u16, ca: &Path) -> String {
    let mut url = url::Url::parse(&crate::amqp_url()).expect("AMQP_URL is a URL");
    url.set_scheme("amqps").expect("amqps is a valid scheme");
    url.set_host(Some("localhost"))
        .expect("localhost is a valid host");
    url.set_port(Some(port)).expect("a port can be set");
    url.query_pairs_mut()
        .append_pair("cacertfile", &ca.display().to_string());
    url.to_string()
}
