//! The release binaries as child processes of a case: started with the case's database, queue
//! and port, logging to files, killed with SIGKILL when the case wants it or when dropped.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use txoutbox::{Error, Result, Topology};

use crate::services::Services;

/// How long a started binary may take to listen or to start consuming.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Which binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `txoutbox-server`: HTTP API and relay.
    Server,
    /// `txoutbox-consumer`.
    Consumer,
}

impl Kind {
    fn binary(self) -> &'static str {
        match self {
            Kind::Server => "txoutbox-server",
            Kind::Consumer => "txoutbox-consumer",
        }
    }

    /// The `application_name` its Postgres connections carry, so that the harness can find
    /// them in `pg_stat_activity`.
    pub fn application_name(self) -> &'static str {
        match self {
            Kind::Server => "chaos-server",
            Kind::Consumer => "chaos-consumer",
        }
    }
}

/// `url` with `application_name=<name>` added to its query.
fn with_application_name(url: &str, name: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}application_name={name}")
}

/// What every process of one case shares.
pub struct Launcher<'s> {
    bin_dir: PathBuf,
    log_dir: PathBuf,
    /// Prefix of the log files: the case's name.
    case: String,
    database_url: String,
    amqp_url: String,
    topology: Topology,
    services: &'s Services,
}

impl<'s> Launcher<'s> {
    /// Binaries next to this executable; logs `<log_dir>/<case>-<name>.log`.
    pub fn new(
        log_dir: &Path,
        case: &str,
        database_url: &str,
        amqp_url: &str,
        topology: &Topology,
        services: &'s Services,
    ) -> Result<Launcher<'s>> {
        let exe = std::env::current_exe()
            .map_err(|e| Error::Other(format!("cannot locate the txoutbox-chaos executable: {e}")))?;
        let bin_dir = exe
            .parent()
            .ok_or_else(|| Error::Other(format!("{} has no directory", exe.display())))?
            .to_path_buf();
        for kind in [Kind::Server, Kind::Consumer] {
            let path = bin_dir.join(kind.binary());
            if !path.is_file() {
                return Err(Error::Config(format!(
                    "{} not found: build every binary first (cargo build --release --bins, which \
                     `make chaos` does)",
                    path.display()
                )));
            }
        }
        Ok(Launcher {
            bin_dir,
            log_dir: log_dir.to_path_buf(),
            case: case.to_string(),
            database_url: database_url.to_string(),
            amqp_url: amqp_url.to_string(),
            topology: topology.clone(),
            services,
        })
    }

    /// Starts `kind` as `name` (the log is `<case>-<name>.log`); `http_addr` for a server.
    pub fn spawn(&self, kind: Kind, name: &str, http_addr: Option<SocketAddr>) -> Result<Proc<'s>> {
        let log_path = self.log_dir.join(format!("{}-{name}.log", self.case));
        let log = File::create(&log_path)
            .map_err(|e| Error::Other(format!("cannot create {}: {e}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(|e| Error::Other(format!("cannot open {}: {e}", log_path.display())))?;
        let mut command = Command::new(self.bin_dir.join(kind.binary()));
        command
            .env(
                "DATABASE_URL",
                with_application_name(&self.database_url, kind.application_name()),
            )
            .env("AMQP_URL", &self.amqp_url)
            .env("AMQP_EXCHANGE", &self.topology.exchange)
            .env("AMQP_QUEUE", &self.topology.queue)
            .env("RUST_LOG", "warn")
            // A free port for the consumer's metrics: no clash with another consumer on this host.
            .env("CONSUMER_METRICS_ADDR", "127.0.0.1:0")
            // The harness's client sends no bearer token.
            .env_remove("API_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        if let Some(addr) = http_addr {
            command.env("HTTP_ADDR", addr.to_string());
        }
        let child = command
            .spawn()
            .map_err(|e| Error::Other(format!("cannot start {}: {e}", kind.binary())))?;
        let name = format!("{}-{name}", self.case);
        self.services.register_child(child.id(), &name);
        Ok(Proc {
            name,
            child: Some(child),
            log_path,
            services: self.services,
        })
    }
}

/// A running child; SIGKILLed and reaped when dropped.
pub struct Proc<'s> {
    name: String,
    child: Option<Child>,
    /// Where its stdout and stderr go.
    pub log_path: PathBuf,
    services: &'s Services,
}

impl Proc<'_> {
    /// `kill -9`, and reap it.
    pub fn kill9(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        // Child::kill sends SIGKILL on Unix.
        let killed = child
            .kill()
            .map_err(|e| Error::Other(format!("cannot kill -9 {} (pid {pid}): {e}", self.name)));
        let _ = child.wait();
        self.services.unregister_child(pid);
        killed
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let Some(child) = self.child.as_ref() else {
            return Err(Error::Other(format!("{} was killed", self.name)));
        };
        let status = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .map_err(|e| Error::Other(format!("cannot run kill -{signal}: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::Other(format!(
                "kill -{signal} {} failed ({status})",
                self.name
            )))
        }
    }

    /// An error when the process has exited, naming its log.
    pub fn check_alive(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Err(Error::Other(format!("{} was killed", self.name)));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::Other(format!(
                "{} exited ({status}); see {}",
                self.name,
                self.log_path.display()
            ))),
            Err(e) => Err(Error::Other(format!("cannot check on {}: {e}", self.name))),
        }
    }

    /// Waits until `addr` accepts connections (the server is listening).
    pub fn wait_listening(&mut self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Other(format!(
                    "{} does not listen on {addr} after {} s; see {}",
                    self.name,
                    READY_TIMEOUT.as_secs(),
                    self.log_path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc<'_> {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

#[cfg(test)]
mod tests {
    use super::with_application_name;

    #[test]
    fn the_application_name_joins_the_query() {
        assert_eq!(
            with_application_name("postgres://h/db", "x"),
            "postgres://h/db?application_name=x"
        );
        assert_eq!(
            with_application_name("postgres://h/db?sslmode=disable", "x"),
            "postgres://h/db?sslmode=disable&application_name=x"
        );
    }
}
