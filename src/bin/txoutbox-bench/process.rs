//! The release binaries as child processes: started with a scenario's settings, logs to files,
//! waited for, measured (peak RSS), and killed when dropped, whatever path the bench takes.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use txoutbox::{Error, Result};

use crate::infra::{FreshBroker, FreshDb};

/// How long a started binary may take to listen or to start consuming.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

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
}

/// Where the binaries are and where their logs go.
pub struct Launcher {
    bin_dir: PathBuf,
    log_dir: PathBuf,
    amqp_url: String,
}

impl Launcher {
    /// Binaries next to the running bench executable; logs under `log_dir`.
    pub fn new(log_dir: &Path, amqp_url: &str) -> Result<Launcher> {
        let exe = std::env::current_exe()
            .map_err(|e| Error::Other(format!("cannot locate the bench executable: {e}")))?;
        let bin_dir = exe
            .parent()
            .ok_or_else(|| Error::Other(format!("{} has no directory", exe.display())))?
            .to_path_buf();
        for kind in [Kind::Server, Kind::Consumer] {
            let path = bin_dir.join(kind.binary());
            if !path.is_file() {
                return Err(Error::Config(format!(
                    "{} not found: build every binary first (cargo build --release --bins, \
                     which `make bench` does)",
                    path.display()
                )));
            }
        }
        std::fs::create_dir_all(log_dir)
            .map_err(|e| Error::Other(format!("cannot create {}: {e}", log_dir.display())))?;
        Ok(Launcher {
            bin_dir,
            log_dir: log_dir.to_path_buf(),
            amqp_url: amqp_url.to_string(),
        })
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
    ) -> Result<Service> {
        let log_path = self.log_dir.join(format!("{name}.log"));
        let log = File::create(&log_path)
            .map_err(|e| Error::Other(format!("cannot create {}: {e}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(|e| Error::Other(format!("cannot open {}: {e}", log_path.display())))?;
        let mut command = Command::new(self.bin_dir.join(kind.binary()));
        command
            .env("DATABASE_URL", &db.url)
            .env("AMQP_URL", &self.amqp_url)
            .env("AMQP_EXCHANGE", &broker.topology.exchange)
            .env("AMQP_QUEUE", &broker.topology.queue)
            .env("RUST_LOG", "info")
            // Several consumers may run at once (scale-out): each takes a port of its own.
            .env("CONSUMER_METRICS_ADDR", "127.0.0.1:0")
            // The bench's client sends no bearer token.
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
        Ok(Service {
            name: name.to_string(),
            child,
            log_path,
        })
    }
}

/// A running child process; killed (and reaped) when dropped.
pub struct Service {
    name: String,
    child: Child,
    log_path: PathBuf,
}

impl Service {
    /// An error when the process has exited, naming its log.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
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

    /// Peak resident set size so far (`VmHWM` in /proc/<pid>/status), in bytes.
    pub fn peak_rss_bytes(&self) -> Result<u64> {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path)
            .map_err(|e| Error::Other(format!("cannot read {path} of {}: {e}", self.name)))?;
        parse_vm_hwm(&status).ok_or_else(|| Error::Other(format!("{path} has no VmHWM line")))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `broker`'s queue has `consumers` consumers, checking that `services` live.
pub fn wait_consuming(broker: &FreshBroker, consumers: u64, services: &mut [&mut Service]) -> Result<()> {
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
