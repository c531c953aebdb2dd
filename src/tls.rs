//! TLS for both connections, on one stack (`native-tls`, i.e. OpenSSL on Linux).
//!
//! **Postgres.** The driver understands only `sslmode=disable|prefer|require` and no
//! certificate settings, so [`PgTls::from_url`] takes the TLS keys out of a `DATABASE_URL`
//! (URL query or key=value string) and builds the connector they describe:
//!
//! | `sslmode`      | encrypted        | certificate chain checked        | host name checked |
//! |----------------|------------------|----------------------------------|-------------------|
//! | absent         | no (see below)   | –                                | –                 |
//! | `disable`      | no               | –                                | –                 |
//! | `prefer`       | if the server offers it | only when `sslrootcert` is given | no         |
//! | `require`      | yes              | only when `sslrootcert` is given | no                |
//! | `verify-ca`    | yes              | yes                              | no                |
//! | `verify-full`  | yes              | yes                              | yes               |
//!
//! `sslrootcert=/path.pem` names the CA certificate(s) to trust (only those);
//! `sslrootcert=system`, or no `sslrootcert` with `verify-ca`/`verify-full`, trusts the
//! system's store. Without `sslmode` the connection is **not** encrypted, unlike libpq (whose
//! default is `prefer`): the common local set-up pays nothing for TLS, and a remote database
//! should say `sslmode=verify-full` anyway. Client certificates (`sslcert`, `sslkey`) are
//! refused with an error rather than ignored.
//!
//! **RabbitMQ.** `amqps://` URLs get a connector built here; `amqp_url` documents the parameters.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::SystemTime;

use postgres::tls::MakeTlsConnect;
use postgres::Socket;
use postgres_native_tls::MakeTlsConnector;

use crate::config::redact_url;
use crate::{Error, Result};

/// The `sslmode` of a `DATABASE_URL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// No `sslmode` given: not encrypted (libpq would `prefer`).
    Unset,
    /// `disable`: never encrypted.
    Disable,
    /// `prefer`: encrypted when the server offers TLS, not verified.
    Prefer,
    /// `require`: encrypted, verified only against a given `sslrootcert`.
    Require,
    /// `verify-ca`: encrypted, the chain verified, any host name.
    VerifyCa,
    /// `verify-full`: encrypted, the chain and the host name verified.
    VerifyFull,
}

/// Which certificates a verifying connection trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// The system's trust store (`sslrootcert=system`, or none given).
    System,
    /// Only the PEM certificate(s) of this file.
    File(PathBuf),
}

/// TLS settings taken out of a `DATABASE_URL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgTlsSettings {
    /// The `sslmode`.
    pub mode: SslMode,
    /// The `sslrootcert`, if given.
    pub root_cert: Option<RootCert>,
}

/// A `DATABASE_URL`'s TLS settings with the connector they need (none without TLS: building
/// one loads the system's trust store, tens of milliseconds).
#[derive(Clone)]
pub struct PgTls {
    settings: PgTlsSettings,
    connector: Option<PgConnector>,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.settings.fmt(f)
    }
}

impl PgTls {
    /// Takes the TLS keys out of `url` and builds their connector. Returns the rest of the
    /// URL (for `postgres::Config`'s parser) and the settings; apply them with [`apply`](Self::apply).
    pub fn from_url(url: &str) -> Result<(String, PgTls)> {
        let (rest, settings) = split_postgres_url(url)?;
        let connector = match settings.mode {
            SslMode::Unset | SslMode::Disable => None,
            _ => Some(PgConnector(MakeTlsConnector::new(pg_connector(&settings)?))),
        };
        Ok((rest, PgTls { settings, connector }))
    }

    /// The settings read from the URL.
    pub fn settings(&self) -> &PgTlsSettings {
        &self.settings
    }

    /// Sets the driver's own `sslmode` on `config` (the stronger modes are `require` for it:
    /// the connector does the verifying).
    pub fn apply(&self, config: &mut postgres::Config) {
        use postgres::config::SslMode as Driver;
        config.ssl_mode(match self.settings.mode {
            SslMode::Unset | SslMode::Disable => Driver::Disable,
            SslMode::Prefer => Driver::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Driver::Require,
        });
    }

    /// Connects with `config` (to which [`apply`](Self::apply) was applied): over TLS as the
    /// settings say, or plainly, with no TLS code on the way.
    pub fn connect(&self, config: &postgres::Config) -> Result<postgres::Client, postgres::Error> {
        match &self.connector {
            Some(connector) => config.connect(connector.clone()),
            None => config.connect(postgres::NoTls),
        }
    }

    /// What to do about a failed connection when TLS caused it, as `"; ..."` to append to the
    /// error's context (the driver's own message leaves the cause out); empty otherwise.
    pub fn explain(&self, error: &postgres::Error, config: &postgres::Config) -> String {
        let mut causes = Vec::new();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            causes.push(cause.to_string());
            source = cause.source();
        }
        let cause = causes.join(": ");
        let lower = cause.to_lowercase();
        let host = match config.get_hosts().first() {
            Some(postgres::config::Host::Tcp(host)) => host.clone(),
            _ => "localhost".to_string(),
        };
        let trusted = match &self.settings.root_cert {
            Some(RootCert::File(path)) => format!("the CA in sslrootcert {}", path.display()),
            _ => "a CA of the system's trust store".to_string(),
        };
        let advice = if lower.contains("hostname mismatch") || lower.contains("ip address mismatch") {
            format!(
                "the server's certificate is not for host {host}; connect by the name on the \
                 certificate or use sslmode=verify-ca"
            )
        } else if lower.contains("certificate verify failed") {
            format!(
                "the server's certificate is not signed by {trusted}; set sslrootcert to the PEM \
                 file of the CA that signed it (or sslmode=require to encrypt without verifying)"
            )
        } else if lower.contains("server does not support tls") {
            "the server does not offer TLS: turn ssl on in postgresql.conf, or use \
             sslmode=prefer or sslmode=disable"
                .to_string()
        } else if error.to_string().contains("TLS") {
            "the TLS handshake failed".to_string()
        } else {
            return String::new();
        };
        format!("; {advice} ({cause})")
    }
}

/// A Postgres TLS connector: `postgres-native-tls`'s, with `Debug` (the pool's manager needs it).
#[derive(Clone)]
pub struct PgConnector(MakeTlsConnector);

impl fmt::Debug for PgConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PgConnector")
    }
}

impl MakeTlsConnect<Socket> for PgConnector {
    type Stream = postgres_native_tls::TlsStream<Socket>;
    type TlsConnect = postgres_native_tls::TlsConnector;
    type Error = native_tls::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        MakeTlsConnect::<Socket>::make_tls_connect(&mut self.0, domain)
    }
}

const PG_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits the TLS keys off a Postgres URL or key=value string: the rest, and what they said.
pub fn split_postgres_url(url: &str) -> Result<(String, PgTlsSettings)> {
    let bad = |why: String| Error::Config(format!("DATABASE_URL {} is not usable: {why}", redact_url(url)));
    let (rest, taken) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        split_url_query(url)
    } else {
        split_key_values(url).map_err(bad)?
    };
    let mut settings = PgTlsSettings {
        mode: SslMode::Unset,
        root_cert: None,
    };
    for (key, value) in taken {
        match key.as_str() {
            "sslmode" => {
                settings.mode = match value.as_str() {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(bad(format!(
                            "sslmode {other:?} is not supported; use disable, prefer, require, \
                             verify-ca or verify-full"
                        )))
                    }
                }
            }
            "sslrootcert" if value == "system" => settings.root_cert = Some(RootCert::System),
            "sslrootcert" => settings.root_cert = Some(RootCert::File(PathBuf::from(value))),
            _ => {
                return Err(bad(format!(
                    "{key} (client certificates) is not supported; authenticate with a password"
                )))
            }
        }
    }
    if settings.root_cert.is_some() && matches!(settings.mode, SslMode::Unset | SslMode::Disable) {
        return Err(bad(
            "sslrootcert is given but TLS is off; add sslmode=verify-full (or verify-ca, require)".into(),
        ));
    }
    Ok((rest, settings))
}

/// `postgres://...?a=1&sslmode=x` -> (`postgres://...?a=1`, [(sslmode, x)]), values decoded.
fn split_url_query(url: &str) -> (String, Vec<(String, String)>) {
    let Some((head, query)) = url.split_once('?') else {
        return (url.to_string(), Vec::new());
    };
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key);
        if PG_KEYS.contains(&key.as_str()) {
            taken.push((key, decode(value)));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        head.to_string()
    } else {
        format!("{head}?{}", kept.join("&"))
    };
    (rest, taken)
}

fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// `host=h sslmode='verify-full'` -> (`host=h`, [(sslmode, verify-full)]), by the driver's
/// rules: `key = value`, the value bare or in single quotes, `\` escaping the next character.
fn split_key_values(text: &str) -> Result<(String, Vec<(String, String)>), String> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|&(_, c)| c);
    let offset = |i: usize| chars.get(i).map_or(text.len(), |&(o, _)| o);
    let mut rest = String::new();
    let mut taken = Vec::new();
    let mut i = 0;
    loop {
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        if at(i).is_none() {
            break;
        }
        let start = i;
        while at(i).is_some_and(|c| c != '=' && !c.is_whitespace()) {
            i += 1;
        }
        let key = text[offset(start)..offset(i)].to_string();
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        if at(i) != Some('=') {
            return Err(format!("expected = after {key:?}"));
        }
        i += 1;
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        let mut value = String::new();
        if at(i) == Some('\'') {
            i += 1;
            loop {
                match at(i) {
                    None => return Err(format!("unterminated quoted value of {key:?}")),
                    Some('\'') => break,
                    Some('\\') => {
                        i += 1;
                        value.extend(at(i));
                    }
                    Some(c) => value.push(c),
                }
                i += 1;
            }
            i += 1;
        } else {
            while let Some(c) = at(i).filter(|c| !c.is_whitespace()) {
                if c == '\\' {
                    i += 1;
                    value.extend(at(i));
                } else {
                    value.push(c);
                }
                i += 1;
            }
        }
        if PG_KEYS.contains(&key.as_str()) {
            taken.push((key, value));
        } else {
            if !rest.is_empty() {
                rest.push(' ');
            }
            rest.push_str(&text[offset(start)..offset(i)]);
        }
    }
    Ok((rest, taken))
}

/// Reads the PEM certificate(s) of `path`; `what` names the setting in errors.
fn read_certificates(path: &Path, what: &str) -> Result<Vec<native_tls::Certificate>> {
    let pem = std::fs::read(path).map_err(|e| {
        Error::Config(format!(
            "{what} {} cannot be read: {e}; give a readable PEM file of the CA that signed the \
             server's certificate",
            path.display()
        ))
    })?;
    let certs = native_tls::Certificate::stack_from_pem(&pem).map_err(|e| {
        Error::Config(format!(
            "{what} {} is not a PEM certificate file: {e}",
            path.display()
        ))
    })?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

fn trust_only(builder: &mut native_tls::TlsConnectorBuilder, path: &Path, what: &str) -> Result<()> {
    builder.disable_built_in_roots(true);
    for cert in read_certificates(path, what)? {
        builder.add_root_certificate(cert);
    }
    Ok(())
}

fn build(builder: &native_tls::TlsConnectorBuilder) -> Result<native_tls::TlsConnector> {
    builder
        .build()
        .map_err(|e| Error::Other(format!("cannot set up TLS: {e}")))
}

/// The native-tls connector for Postgres settings with TLS (see the module's table).
fn pg_connector(settings: &PgTlsSettings) -> Result<native_tls::TlsConnector> {
    let mut builder = native_tls::TlsConnector::builder();
    let mode = settings.mode;
    let verify_chain =
        matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) || settings.root_cert.is_some();
    builder.danger_accept_invalid_certs(!verify_chain);
    builder.danger_accept_invalid_hostnames(mode != SslMode::VerifyFull);
    if let Some(RootCert::File(path)) = &settings.root_cert {
        trust_only(&mut builder, path, "sslrootcert")?;
    }
    build(&builder)
}

/// Connectors already built for `amqps://` URLs, by CA file (and its modification time, so that
/// a rotated file is read again) and verification: building one loads the trust store, which
/// costs tens of milliseconds, and the relay and consumer reconnect with the same URL.
type ConnectorKey = (Option<PathBuf>, Option<SystemTime>, bool);
static AMQP_CONNECTORS: LazyLock<Mutex<HashMap<ConnectorKey, native_tls::TlsConnector>>> =
    LazyLock::new(Default::default);

/// Most connectors kept in [`AMQP_CONNECTORS`]; past it the cache starts over.
const MAX_CACHED_CONNECTORS: usize = 16;

/// The connector for an `amqps://` URL: trusting only the PEM certificate(s) of `cacertfile`
/// when given (else the system's store), and checking nothing when `verify` is false. Built
/// once per CA file (as long as the file is unchanged) and verification.
pub(crate) fn amqp_connector(cacertfile: Option<&Path>, verify: bool) -> Result<native_tls::TlsConnector> {
    let modified = cacertfile.and_then(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok());
    let key = (cacertfile.map(Path::to_path_buf), modified, verify);
    let mut cache = AMQP_CONNECTORS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(connector) = cache.get(&key) {
        return Ok(connector.clone());
    }
    let connector = build_amqp_connector(cacertfile, verify)?;
    if cache.len() >= MAX_CACHED_CONNECTORS {
        cache.clear();
    }
    cache.insert(key, connector.clone());
    Ok(connector)
}

fn build_amqp_connector(cacertfile: Option<&Path>, verify: bool) -> Result<native_tls::TlsConnector> {
    let mut builder = native_tls::TlsConnector::builder();
    if let Some(path) = cacertfile {
        trust_only(&mut builder, path, "cacertfile")?;
    }
    if !verify {
        builder.danger_accept_invalid_certs(true);
        builder.danger_accept_invalid_hostnames(true);
    }
    build(&builder)
}

/// What to do about a failed `amqps` handshake with `host`, from the TLS error's text.
pub(crate) fn amqp_advice(error: &str, host: &str, cacertfile: Option<&Path>) -> String {
    let lower = error.to_lowercase();
    if lower.contains("hostname mismatch") || lower.contains("ip address mismatch") {
        format!(
            "the broker's certificate is not for host {host}; connect by the name on the \
             certificate (or, for development only, add verify=verify_none)"
        )
    } else if lower.contains("certificate verify failed") {
        let trusted = match cacertfile {
            Some(path) => format!("the CA in cacertfile {}", path.display()),
            None => "a CA of the system's trust store".to_string(),
        };
        format!(
            "the broker's certificate is not signed by {trusted}; set cacertfile=/path/to/ca.pem \
             to the CA that signed it"
        )
    } else if lower.contains("wrong version number")
        || lower.contains("packet length too long")
        || lower.contains("unexpected eof")
        || lower.contains("record layer failure")
    {
        "the port does not speak TLS: is it RabbitMQ's TLS listener (amqps defaults to 5671)? \
         Use amqp:// for the plain port"
            .to_string()
    } else {
        "the TLS handshake failed".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, PgTlsSettings) {
        split_postgres_url(url).unwrap()
    }

    #[test]
    fn url_query_keys_are_taken_out() {
        let (rest, s) = split("postgres://u:p@localhost:5432/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&connect_timeout=3");
        assert_eq!(rest, "postgres://u:p@localhost:5432/db?connect_timeout=3");
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert, Some(RootCert::File("/tmp/ca.pem".into())));
        let (rest, s) = split("postgresql://localhost/db?sslmode=require");
        assert_eq!(rest, "postgresql://localhost/db");
        assert_eq!((s.mode, s.root_cert), (SslMode::Require, None));
        let (rest, s) = split("postgres://localhost/db");
        assert_eq!(rest, "postgres://localhost/db");
        assert_eq!(s.mode, SslMode::Unset);
        assert_eq!(
            split("postgres://h/d?sslmode=verify-ca&sslrootcert=system")
                .1
                .root_cert,
            Some(RootCert::System)
        );
        assert_eq!(split("postgres://h/d?sslmode=prefer").1.mode, SslMode::Prefer);
        assert_eq!(split("postgres://h/d?sslmode=disable").1.mode, SslMode::Disable);
    }

    #[test]
    fn key_value_keys_are_taken_out() {
        let (rest, s) =
            split("host=localhost  sslmode = verify-ca sslrootcert='/a b/c\\'s.pem' user=x password='p w'");
        assert_eq!(rest, "host=localhost user=x password='p w'");
        assert_eq!(s.mode, SslMode::VerifyCa);
        assert_eq!(s.root_cert, Some(RootCert::File("/a b/c's.pem".into())));
        let (rest, s) = split("host=h dbname=d");
        assert_eq!((rest.as_str(), s.mode), ("host=h dbname=d", SslMode::Unset));
        assert!(rest.parse::<postgres::Config>().is_ok());
        assert!(split_postgres_url("host=h sslmode").is_err());
        assert!(split_postgres_url("host=h sslmode='x").is_err());
    }

    #[test]
    fn unusable_settings_say_what_to_do() {
        let err = |url: &str| split_postgres_url(url).unwrap_err().to_string();
        assert!(
            err("postgres://h/d?sslmode=allow").contains("verify-full"),
            "{}",
            err("postgres://h/d?sslmode=allow")
        );
        assert!(err("postgres://h/d?sslmode=require&sslcert=/c.pem").contains("not supported"));
        assert!(err("postgres://h/d?sslrootcert=/c.pem").contains("add sslmode=verify-full"));
        let missing =
            PgTls::from_url("postgres://u:secret@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
                .unwrap_err()
                .to_string();
        assert!(
            missing.contains("sslrootcert /nonexistent/ca.pem cannot be read"),
            "{missing}"
        );
        let not_pem = PgTls::from_url("postgres://h/d?sslmode=verify-ca&sslrootcert=/etc/hostname")
            .unwrap_err()
            .to_string();
        assert!(not_pem.contains("/etc/hostname"), "{not_pem}");
    }

    #[test]
    fn the_driver_gets_its_own_mode() {
        use postgres::config::SslMode as Driver;
        for (url, expected) in [
            ("postgres://h/d", Driver::Disable),
            ("postgres://h/d?sslmode=prefer", Driver::Prefer),
            ("postgres://h/d?sslmode=require", Driver::Require),
            ("postgres://h/d?sslmode=verify-ca", Driver::Require),
            ("postgres://h/d?sslmode=verify-full", Driver::Require),
        ] {
            let (rest, tls) = PgTls::from_url(url).unwrap();
            let mut config: postgres::Config = rest.parse().unwrap();
            tls.apply(&mut config);
            assert_eq!(config.get_ssl_mode(), expected, "{url}");
        }
    }
}
