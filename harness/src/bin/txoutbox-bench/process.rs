//! The release binaries as the bench starts them: on a scenario's database and queue, logging
//! at `info` to `<log dir>/<name>.log`, measured (peak RSS). The rest is
//! [`txoutbox_harness::support::process`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use txoutbox::{Error, Result};

use crate::infra::{FreshBroker, FreshDb};
use txoutbox_harness::support::process::{Binaries, ChildEnv, READY_TIMEOUT};
pub use txoutbox_harness::support::process::{Kind, Process};

/// Where the binaries are and where their logs go.
pub struct Launcher {
    binaries: Binaries,
    log_dir: PathBuf,
    amqp_url: String,
}

impl Launcher {
    /// Binaries next to the running bench executable; logs under `log_dir`.
    pub fn new(log_dir: &Path, amqp_url: &str) -> Result<Launcher> {
        let binaries = Binaries::locate("bench")?;
        std::fs::create_dir_all(log_dir)
            .map_err(|e| Error::Other(format!("cannot create {}: {e}", log_dir.display())))?;
        Ok(Launcher {
            binaries,
            log_dir: log_dir.to_path_buf(),
            amqp_url: amqp_url.to_string(),
        })
    }

    /// The run's directory (the one above the logs).
    pub fn run_dir(&self) -> &Path {
        self.log_dir.parent().unwrap_or(&self.log_dir)
    }

    /// Starts `kind` on the scenario's database and queue; `http_addr` for a server.
    /// Its stdout and stderr go to `<log dir>/<name>.log`.
    pub fn spawn(
        &self,
        kind: Kind,
        name: &str,
        db: &FreshDb,
        broker: &FreshBroker,
        http_addr: Option<SocketAddr>,
    ) -> Result<Process> {
        self.spawn_at(kind, name, &db.url, broker, http_addr)
    }

    /// [`Launcher::spawn`] on the database at `database_url` (the scenario's, as another role).
    pub fn spawn_at(
        &self,
        kind: Kind,
        name: &str,
        database_url: &str,
        broker: &FreshBroker,
        http_addr: Option<SocketAddr>,
    ) -> Result<Process> {
        let env = ChildEnv {
            database_url,
            amqp_url: &self.amqp_url,
            topology: &broker.topology,
            rust_log: "info",
            http_addr,
        };
        let log_path = self.log_dir.join(format!("{name}.log"));
        self.binaries.spawn(kind, name.to_string(), log_path, &env)
    }

    /// [`Launcher::spawn`] with more settings (environment variables).
    pub fn spawn_with(
        &self,
        kind: Kind,
        name: &str,
        db: &FreshDb,
        broker: &FreshBroker,
        http_addr: Option<SocketAddr>,
        settings: &[(&str, String)],
    ) -> Result<Process> {
        let env = ChildEnv {
            database_url: &db.url,
            amqp_url: &self.amqp_url,
            topology: &broker.topology,
            rust_log: "info",
            http_addr,
        };
        let log_path = self.log_dir.join(format!("{name}.log"));
        self.binaries
            .spawn_with(kind, name.to_string(), log_path, &env, settings)
    }
}

/// Waits until `broker`'s queue has `consumers` consumers, checking that `services` live.
pub fn wait_consuming(broker: &FreshBroker, consumers: u64, services: &mut [&mut Process]) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        for service in services.iter_mut() {
            service.check_alive()?;
        }
        if broker.depth()?.consumers >= consumers {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Other(format!(
                "queue {} has fewer than {consumers} consumers after {} s",
                broker.topology.queue,
                READY_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Peak resident set size of `process` so far (`VmHWM` in /proc/<pid>/status), in bytes.
pub fn peak_rss_bytes(process: &Process) -> Result<u64> {
    let pid = process
        .id()
        .ok_or_else(|| Error::Other(format!("{} was killed", process.name)))?;
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .map_err(|e| Error::Other(format!("cannot read {path} of {}: {e}", process.name)))?;
    parse_vm_hwm(&status).ok_or_else(|| Error::Other(format!("{path} has no VmHWM line")))
}

/// The `VmHWM:  1234 kB` line of a /proc status file, in bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut fields = line["VmHWM:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => Some(value * 1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::parse_vm_hwm;

    #[test]
    fn peak_rss_is_read_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2 * 1024 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS: 1 kB"), None);
    }
}
