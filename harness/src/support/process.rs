//! The release binaries as child processes: found next to the harness executable, started with
//! a run's database, queue and port, logging to a file, waited for, and killed (SIGKILL) and reaped when dropped, whatever path the run takes.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use txoutbox::{Error, Result, Topology};

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
    /// Its executable's name.
    pub fn binary(self) -> &'static str {
        match self {
            Kind::Server => "txoutbox-server",
            Kind::Consumer => "txoutbox-consumer",
        }
    }
}

/// What a started binary is told through its environment.
pub struct ChildEnv<'a> {
    /// `DATABASE_URL`.
    pub database_url: &'a str,
    /// `AMQP_URL`.
    pub amqp_url: &'a str,
    /// `AMQP_EXCHANGE`, `AMQP_QUEUE` and `AMQP_SINGLE_ACTIVE_CONSUMER`.
    pub topology: &'a Topology,
    /// `RUST_LOG`.
    pub rust_log: &'a str,
    /// `HTTP_ADDR`, for a server.
    pub http_addr: Option<SocketAddr>,
}

/// The directory of the release binaries: the one of the running harness executable.
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// Finds the server and consumer next to this executable, `txoutbox-<harness>`; when one is
    /// missing the error says to build them (`make <harness>` does).
    pub fn locate(harness: &str) -> Result<Binaries> {
        let exe = std::env::current_exe()
            .map_err(|e| Error::Other(format!("cannot locate the txoutbox-{harness} executable: {e}")))?;
        let dir = exe
            .parent()
            .ok_or_else(|| Error::Other(format!("{} has no directory", exe.display())))?
            .to_path_buf();
        for kind in [Kind::Server, Kind::Consumer] {
            let path = dir.join(kind.binary());
            if !path.is_file() {
                return Err(Error::Config(format!(
                    "{} not found: build every binary first (cargo build --release --bins, which \
                     `make {harness}` does)",
                    path.display()
                )));
            }
        }
        Ok(Binaries { dir })
    }

    /// Starts `kind` as `name` with `env`; its stdout and stderr go to `log_path`.
    pub fn spawn(&self, kind: Kind, name: String, log_path: PathBuf, env: &ChildEnv) -> Result<Process> {
        self.spawn_with(kind, name, log_path, env, &[])
    }

    /// [`Binaries::spawn`] with more settings (`(name, value)` environment variables), set last.
    pub fn spawn_with(
        &self,
        kind: Kind,
        name: String,
        log_path: PathBuf,
        env: &ChildEnv,
        settings: &[(&str, String)],
    ) -> Result<Process> {
        let log = File::create(&log_path)
            .map_err(|e| Error::Other(format!("cannot create {}: {e}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(|e| Error::Other(format!("cannot open {}: {e}", log_path.display())))?;
        let mut command = Command::new(self.dir.join(kind.binary()));
        command
            .env("DATABASE_URL", env.database_url)
            .env("AMQP_URL", env.amqp_url)
            .env("AMQP_EXCHANGE", &env.topology.exchange)
            .env("AMQP_QUEUE", &env.topology.queue)
            .env(
                "AMQP_SINGLE_ACTIVE_CONSUMER",
                env.topology.single_active_consumer.to_string(),
            )
            .env("RUST_LOG", env.rust_log)
            // Several consumers may run at once (scale-out): each takes a port of its own.
            .env("CONSUMER_METRICS_ADDR", "127.0.0.1:0")
            // The harness's client sends no bearer token.
            .env_remove("API_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        if let Some(addr) = env.http_addr {
            command.env("HTTP_ADDR", addr.to_string());
        }
        for (name, value) in settings {
            command.env(name, value);
        }
        let child = command
            .spawn()
            .map_err(|e| Error::Other(format!("cannot start {}: {e}", kind.binary())))?;
        Ok(Process {
            name,
            child: Some(child),
            log_path,
        })
    }
}

/// A running child process; SIGKILLed and reaped when dropped.
pub struct Process {
    /// The name it was started as, for messages.
    pub name: String,
    child: Option<Child>,
    /// Where its stdout and stderr go.
    pub log_path: PathBuf,
}

impl Process {
    /// Its process id, until it is killed.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`, and reap it (nothing when it was killed before).
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
        killed
    }

    /// An error when the process has exited (naming its log) or was killed.
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

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// A free TCP port on 127.0.0.1 (bound, read, released: good until someone else takes it).
pub fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| Error::Other(format!("cannot find a free port on 127.0.0.1: {e}")))
}
