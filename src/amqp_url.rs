//! Opening an amiquip connection from an AMQP URL ourselves, so that the socket has
//! `TCP_NODELAY`: amiquip's own `insecure_open` leaves Nagle's algorithm on, and a lone
//! publish or ack then waits for the peer's delayed ACK (about 40 ms on Linux) before it leaves.

use std::borrow::Cow;
use std::net::{SocketAddr, ToSocketAddrs};
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
            .and_then(|stream| {
                Connection::insecure_open_stream(stream, target.options.clone(), ConnectionTuning::default())
                    .map_err(|e| Error::broker(format!("RabbitMQ at {addr} refused the session"), e))
            });
        match attempt {
            Ok(connection) => return Ok(connection),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error
        .unwrap_or_else(|| Error::Config(format!("AMQP_URL {} resolves to no address", redact_url(url)))))
}

fn parse(text: &str) -> Result<Target> {
    let bad = |why: String| Error::Config(format!("AMQP_URL {} is not usable: {why}", redact_url(text)));
    let url = Url::parse(text).map_err(|e| bad(e.to_string()))?;
    match url.scheme() {
        "amqp" => {}
        "amqps" => {
            return Err(bad(
                "amqps (TLS) is not built in; terminate TLS in front or use amqp://".into(),
            ))
        }
        other => return Err(bad(format!("unknown scheme {other:?}, expected amqp"))),
    }
    let host = url.host_str().filter(|h| !h.is_empty()).unwrap_or("localhost");
    let port = url.port().unwrap_or(5672);
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
            other => return Err(bad(format!("unsupported parameter {other:?}"))),
        }
    }
    Ok(Target {
        addrs,
        options,
        connect_timeout,
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
        assert!(parse("amqps://127.0.0.1").is_err());
        assert!(parse("http://127.0.0.1").is_err());
        assert!(parse("amqp://127.0.0.1/a/b").is_err());
        assert!(parse("amqp://127.0.0.1/?heartbeat=x").is_err());
        assert!(parse("amqp://127.0.0.1/?bogus=1").is_err());
    }
}
