//! Opening an amiquip connection from an AMQP URL ourselves, so that the socket has
//! `TCP_NODELAY`: amiquip's own `insecure_open` leaves Nagle's algorithm on, and a lone
//! publish or ack then waits for the peer's delayed ACK (about 40 ms on Linux) before it leaves.
//!
//! `amqps://` URLs (default port 5671) speak TLS on that socket, verifying the broker's
//! certificate chain and host name. Their query parameters, besides `heartbeat`,
//! `connection_timeout` and `channel_max`:
//! - `cacertfile=/path/ca.pem`: trust only the CA certificate(s) of this PEM file (RabbitMQ's
//!   own name for it) instead of the system's trust store;
//! - `verify=verify_none`: check neither chain nor host name (development only; the default
//!   is `verify_peer`).

use std::borrow::Cow;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use amiquip::{Auth, Connection, ConnectionOptions, ConnectionTuning};
use url::Url;

use crate::config::redact_url;
use crate::{Error, Result};

/// Default connect timeout when the URL sets no `connection_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where to connect and how to log in, read from an `amqp://` URL.
#[derive(Debug)]
struct Target {
    addrs: Vec<SocketAddr>,
    options: ConnectionOptions<Auth>,
    connect_timeout: Duration,
    tls: Option<Tls>,
}

/// An `amqps` URL's TLS: the connector and the name the certificate must carry.
struct Tls {
    connector: native_tls::TlsConnector,
    domain: String,
    cacertfile: Option<PathBuf>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("domain", &self.domain)
            .field("cacertfile", &self.cacertfile)
            .finish()
    }
}

/// Opens a connection to the broker of `url` (`amqp://user:pass@host:port/vhost?heartbeat=10`)
/// over a socket with `TCP_NODELAY`, trying each address the host resolves to.
pub fn open(url: &str) -> Result<Connection> {
    let target = parse(url)?;
    let mut last_error = None;
    for addr in &target.addrs {
        let attempt = std::net::TcpStream::connect_timeout(addr, target.connect_timeout)
            .and_then(|stream| {
                stream.set_nodelay(true)?;
                mio::net::TcpStream::from_stream(stream)
            })
            .map_err(|e| Error::Other(format!("cannot connect to RabbitMQ at {addr}: {e}")))
            .and_then(|stream| match &target.tls {
                None => Connection::insecure_open_stream(
                    stream,
                    target.options.clone(),
                    ConnectionTuning::default(),
                )
                .map_err(|e| Error::broker(format!("RabbitMQ at {addr} refused the session"), e)),
                Some(tls) => open_tls(tls, addr, stream, &target.options),
            });
        match attempt {
            Ok(connection) => return Ok(connection),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error
        .unwrap_or_else(|| Error::Config(format!("AMQP_URL {} resolves to no address", redact_url(url)))))
}

fn open_tls(
    tls: &Tls,
    addr: &SocketAddr,
    stream: mio::net::TcpStream,
    options: &ConnectionOptions<Auth>,
) -> Result<Connection> {
    Connection::open_tls_stream(
        tls.connector.clone(),
        &tls.domain,
        stream,
        options.clone(),
        ConnectionTuning::default(),
    )
    .map_err(|e| match &e {
        amiquip::Error::TlsHandshake { source } => {
            let advice = crate::tls::amqp_advice(&source.to_string(), &tls.domain, tls.cacertfile.as_deref());
            Error::broker(format!("TLS with RabbitMQ at {addr} failed: {advice}"), e)
        }
        _ => Error::broker(format!("RabbitMQ at {addr} refused the session"), e),
    })
}

fn parse(text: &str) -> Result<Target> {
    let bad = |why: String| Error::Config(format!("AMQP_URL {} is not usable: {why}", redact_url(text)));
    let url = Url::parse(text).map_err(|e| bad(e.to_string()))?;
    let secure = match url.scheme() {
        "amqp" => false,
        "amqps" => true,
        other => return Err(bad(format!("unknown scheme {other:?}, expected amqp or amqps"))),
    };
    let host = url.host_str().filter(|h| !h.is_empty()).unwrap_or("localhost");
    let port = url.port().unwrap_or(if secure { 5671 } else { 5672 });
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| bad(format!("cannot resolve {host}: {e}")))?
        .collect();

    let mut options = ConnectionOptions::default();
    let mut segments = url.path_segments().into_iter().flatten();
    if let Some(vhost) = segments.next().filter(|v| !v.is_empty()) {
        options = options.virtual_host(decode(vhost));
    }
    if segments.next().is_some() {
        return Err(bad("the path may only name the virtual host".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        let username = if url.username().is_empty() {
            "guest"
        } else {
            url.username()
        };
        options = options.auth(Auth::Plain {
            username: decode(username).into_owned(),
            password: decode(url.password().unwrap_or("guest")).into_owned(),
        });
    }
    let mut connect_timeout = DEFAULT_CONNECT_TIMEOUT;
    let (mut cacertfile, mut verify) = (None, true);
    for (key, value) in url.query_pairs() {
        let number = |what: &str| {
            value
                .parse::<u64>()
                .map_err(|_| bad(format!("{what} must be a number, got {value:?}")))
        };
        match key.as_ref() {
            "heartbeat" => {
                let secs = number("heartbeat")?;
                options =
                    options.heartbeat(u16::try_from(secs).map_err(|_| bad("heartbeat is too large".into()))?);
            }
            "connection_timeout" => {
                connect_timeout = Duration::from_millis(number("connection_timeout")?);
                options = options.connection_timeout(Some(connect_timeout));
            }
            "channel_max" => {
                let max = number("channel_max")?;
                options = options
                    .channel_max(u16::try_from(max).map_err(|_| bad("channel_max is too large".into()))?);
            }
            "cacertfile" | "verify" if !secure => {
                return Err(bad(format!("{key} applies to amqps:// URLs only")));
            }
            "cacertfile" => cacertfile = Some(PathBuf::from(value.as_ref())),
            "verify" => {
                verify = match value.as_ref() {
                    "verify_peer" => true,
                    "verify_none" => false,
                    other => {
                        return Err(bad(format!(
                            "verify must be verify_peer or verify_none, got {other:?}"
                        )))
                    }
                }
            }
            other => return Err(bad(format!("unsupported parameter {other:?}"))),
        }
    }
    let tls = match secure {
        false => None,
        true => Some(Tls {
            connector: crate::tls::amqp_connector(cacertfile.as_deref(), verify)?,
            // An IPv6 literal's brackets are not part of the name on a certificate.
            domain: host.trim_start_matches('[').trim_end_matches(']').to_string(),
            cacertfile,
        }),
    };
    Ok(Target {
        addrs,
        options,
        connect_timeout,
        tls,
    })
}

fn decode(text: &str) -> Cow<'_, str> {
    percent_encoding::percent_decode_str(text).decode_utf8_lossy()
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn urls_parse_into_options() {
        let t = parse("amqp://u%40x:p%2Fw@127.0.0.1:5673/%2f?heartbeat=7&connection_timeout=1500").unwrap();
        assert_eq!(t.addrs[0].port(), 5673);
        assert_eq!(t.connect_timeout.as_millis(), 1500);
        let shown = format!("{:?}", t.options);
        assert!(
            shown.contains("heartbeat: 7") && shown.contains("\"/\""),
            "{shown}"
        );
        assert!(shown.contains("u@x") && shown.contains("p/w"), "{shown}");
        assert!(parse("amqp://127.0.0.1").is_ok());
        let tls =
            parse("amqps://localhost/?cacertfile=%2Fetc%2Fssl%2Fcerts%2Fssl-cert-snakeoil.pem").unwrap();
        assert_eq!(tls.addrs[0].port(), 5671);
        assert!(format!("{:?}", tls.tls).contains("snakeoil"));
        assert!(parse("amqps://127.0.0.1:5673/?verify=verify_none").is_ok());
        assert!(parse("amqps://127.0.0.1/?verify=yes").is_err());
        assert!(parse("amqp://127.0.0.1/?cacertfile=/x.pem").is_err());
        let missing = parse("amqps://127.0.0.1/?cacertfile=/nonexistent.pem")
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("cacertfile /nonexistent.pem cannot be read"),
            "{missing}"
        );
        assert!(parse("http://127.0.0.1").is_err());
        assert!(parse("amqp://127.0.0.1/a/b").is_err());
        assert!(parse("amqp://127.0.0.1/?heartbeat=x").is_err());
        assert!(parse("amqp://127.0.0.1/?bogus=1").is_err());
    }
}
