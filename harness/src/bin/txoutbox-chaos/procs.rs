//! The release binaries as child processes of a case: started with the case's database, queue
//! and port, logging at `warn` to `<out>/<case>-<name>.log`, known to [`Services`] (so that a
//! signal kills them too), killed with SIGKILL when the case wants it or when dropped. The
//! rest is [`txoutbox_harness::support::process`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use txoutbox::{Error, Result, Topology};

use crate::services::Services;
use txoutbox_harness::support::process::{Binaries, ChildEnv, Process};
pub use txoutbox_harness::support::process::{Kind, READY_TIMEOUT};

/// The `application_name` the Postgres connections of `kind` carry, so that the harness can
/// find them in `pg_stat_activity`.
pub fn application_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Server => "chaos-server",
        Kind::Consumer => "chaos-consumer",
    }
}

/// `url` with `application_name=<name>` added to its query.
fn with_application_name(url: &str, name: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}application_name={name}")
}

/// What every process of one case shares.
pub struct Launcher<'s> {
    binaries: Binaries,
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
        Ok(Launcher {
            binaries: Binaries::locate("chaos")?,
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
        let database_url = with_application_name(&self.database_url, application_name(kind));
        let env = ChildEnv {
            database_url: &database_url,
            amqp_url: &self.amqp_url,
            topology: &self.topology,
            rust_log: "warn",
            http_addr,
        };
        let name = format!("{}-{name}", self.case);
        let log_path = self.log_dir.join(format!("{name}.log"));
        let process = self.binaries.spawn(kind, name.clone(), log_path, &env)?;
        if let Some(pid) = process.id() {
            self.services.register_child(pid, &name);
        }
        Ok(Proc {
            process,
            services: self.services,
        })
    }
}

/// A running child known to the services; SIGKILLed, reaped and forgotten when dropped.
pub struct Proc<'s> {
    process: Process,
    services: &'s Services,
}

impl Proc<'_> {
    /// Where its stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.process.log_path
    }

    /// `kill -9`, reap it, and forget it.
    pub fn kill9(&mut self) -> Result<()> {
        let pid = self.process.id();
        let killed = self.process.kill9();
        if let Some(pid) = pid {
            self.services.unregister_child(pid);
        }
        killed
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let name = &self.process.name;
        let Some(pid) = self.process.id() else {
            return Err(Error::Other(format!("{name} was killed")));
        };
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .map_err(|e| Error::Other(format!("cannot run kill -{signal}: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::Other(format!("kill -{signal} {name} failed ({status})")))
        }
    }

    /// (threads, open descriptors) of the process, from `/proc`; `None` once it is gone.
    pub fn resources(&self) -> Option<(usize, usize)> {
        let pid = self.process.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        Some((threads, fds))
    }

    /// An error when the process has exited (naming its log) or was killed.
    pub fn check_alive(&mut self) -> Result<()> {
        self.process.check_alive()
    }

    /// Waits until `addr` accepts connections (the server is listening).
    pub fn wait_listening(&mut self, addr: SocketAddr) -> Result<()> {
        self.process.wait_listening(addr)
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
