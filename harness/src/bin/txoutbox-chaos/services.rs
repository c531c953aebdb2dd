//! The local Postgres and RabbitMQ as things to stop and start, and the promise that whatever
//! was stopped is started again: by an [`Outage`] guard when it is dropped (also while
//! unwinding from a panic), by [`Services`] when it is dropped, and by a signal thread on
//! Ctrl-C / SIGTERM / SIGHUP, which also kills the child processes and removes the databases
//! and queues of the run before exiting.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postgres::NoTls;
use txoutbox::db::parse_url;
use txoutbox::{Error, Result, Topology};

use crate::options::Case;
use txoutbox_harness::support::database::{drop_database, url_with_database};

/// Longest a `rabbitmqctl` or `pg_ctlcluster` command may take before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest a started service may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Which service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The RabbitMQ application (`rabbitmqctl stop_app` / `start_app`).
    RabbitMq,
    /// The Postgres cluster (`pg_ctlcluster stop` / `start`).
    Postgres,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::RabbitMq => "RabbitMQ",
            Which::Postgres => "Postgres",
        }
    }
}

/// Held by the signal thread while it cleans up (it then exits the process holding it), and
/// taken by [`finish`] before a normal exit, so that the two never race.
static CLEANUP: Mutex<()> = Mutex::new(());
/// Set when a signal arrived: the run stops starting new work.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// True once Ctrl-C, SIGTERM or SIGHUP arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Exits the process with `code`, unless the signal thread is cleaning up: then waits for it
/// (it exits with 130 when done).
pub fn finish(code: i32) -> ! {
    let _guard = CLEANUP.lock().unwrap_or_else(|p| p.into_inner());
    std::process::exit(code)
}

/// Control of the local services, and the record of what must be undone.
pub struct Services {
    inner: Arc<Inner>,
}

struct Inner {
    /// `postgres` maintenance database URL.
    admin_url: String,
    amqp_url: String,
    /// `VERSION NAME` for pg_ctlcluster, when one was found.
    pg_cluster: Option<(String, String)>,
    state: Mutex<State>,
}

/// What the signal thread must undo.
#[derive(Default)]
struct State {
    rabbitmq_down: bool,
    postgres_down: bool,
    /// Child processes by pid, with their names.
    children: BTreeMap<u32, String>,
    databases: Vec<String>,
    topologies: Vec<Topology>,
}

impl Services {
    /// Finds the Postgres cluster and starts the signal thread.
    pub fn install(database_url: &str, amqp_url: &str) -> Result<Services> {
        let inner = Arc::new(Inner {
            admin_url: url_with_database(database_url, "postgres"),
            amqp_url: amqp_url.to_string(),
            pg_cluster: find_cluster(),
            state: Mutex::new(State::default()),
        });
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ])
        .map_err(|e| Error::Other(format!("cannot install the signal handler: {e}")))?;
        let on_signal = inner.clone();
        std::thread::Builder::new()
            .name("chaos-signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    let _guard = CLEANUP.lock().unwrap_or_else(|p| p.into_inner());
                    INTERRUPTED.store(true, Ordering::SeqCst);
                    eprintln!("\ntxoutbox-chaos: signal {signal}: restoring services and cleaning up");
                    on_signal.emergency_cleanup();
                    eprintln!("txoutbox-chaos: interrupted; services restored");
                    std::process::exit(130);
                }
            })
            .map_err(|e| Error::Other(format!("cannot start the signal thread: {e}")))?;
        Ok(Services { inner })
    }

    /// An error naming what is missing for `cases`.
    pub fn check_tools(&self, cases: &[Case]) -> Result<()> {
        if cases.contains(&Case::BrokerOutage) && !on_path("rabbitmqctl") {
            return Err(Error::Config(
                "broker-outage needs rabbitmqctl on PATH (or leave it out with --only)".into(),
            ));
        }
        if cases.contains(&Case::DbRestart) {
            if !on_path("pg_ctlcluster") {
                return Err(Error::Config(
                    "db-restart needs pg_ctlcluster on PATH (or leave it out with --only)".into(),
                ));
            }
            if self.inner.pg_cluster.is_none() {
                return Err(Error::Config(
                    "db-restart: no single Postgres version under /etc/postgresql; set PG_CLUSTER=\"15 main\""
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// Stops `which`; the returned guard starts it again when ended or dropped.
    pub fn stop(&self, which: Which) -> Result<Outage<'_>> {
        // Marked first: a stop interrupted half-way must still be undone.
        self.inner.set_down(which, true);
        let outage = Outage {
            services: self,
            which,
            ended: false,
        };
        let started = Instant::now();
        match which {
            Which::RabbitMq => run("rabbitmqctl", &["-q", "stop_app"])?,
            Which::Postgres => {
                let (version, name) = self.inner.cluster()?;
                run(
                    "pg_ctlcluster",
                    &["--skip-systemctl-redirect", &version, &name, "stop", "-m", "fast"],
                )?
            }
        };
        println!(
            "  {} stopped ({:.1} s)",
            which.name(),
            started.elapsed().as_secs_f64()
        );
        Ok(outage)
    }

    /// Starts every service a case left stopped (normally none).
    pub fn restore_all(&self) {
        self.inner.restore_all();
    }

    /// Remembers a child process for the signal thread.
    pub fn register_child(&self, pid: u32, name: &str) {
        self.inner.lock().children.insert(pid, name.to_string());
    }

    /// Forgets a child process (it was reaped).
    pub fn unregister_child(&self, pid: u32) {
        self.inner.lock().children.remove(&pid);
    }

    /// Remembers a database to drop on a signal.
    pub fn register_database(&self, name: &str) {
        self.inner.lock().databases.push(name.to_string());
    }

    /// Forgets a database (it was dropped).
    pub fn unregister_database(&self, name: &str) {
        self.inner.lock().databases.retain(|d| d != name);
    }

    /// Remembers an exchange and queues to delete on a signal.
    pub fn register_topology(&self, topology: &Topology) {
        self.inner.lock().topologies.push(topology.clone());
    }

    /// Forgets an exchange and queues (they were deleted).
    pub fn unregister_topology(&self, topology: &Topology) {
        self.inner.lock().topologies.retain(|t| t != topology);
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.inner.restore_all();
    }
}

/// A stopped service; [`end`](Self::end) starts it again, and so does dropping it.
pub struct Outage<'a> {
    services: &'a Services,
    which: Which,
    ended: bool,
}

impl Outage<'_> {
    /// Starts the service and waits until it accepts connections; returns how long that took.
    pub fn end(mut self) -> Result<Duration> {
        self.ended = true;
        let started = Instant::now();
        self.services.inner.start(self.which)?;
        let took = started.elapsed();
        println!(
            "  {} started and ready ({:.1} s)",
            self.which.name(),
            took.as_secs_f64()
        );
        Ok(took)
    }
}

impl Drop for Outage<'_> {
    fn drop(&mut self) {
        if !self.ended {
            if let Err(e) = self.services.inner.start(self.which) {
                eprintln!("txoutbox-chaos: cannot start {} again: {e}", self.which.name());
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_down(&self, which: Which, down: bool) {
        let mut state = self.lock();
        match which {
            Which::RabbitMq => state.rabbitmq_down = down,
            Which::Postgres => state.postgres_down = down,
        }
    }

    fn cluster(&self) -> Result<(String, String)> {
        self.pg_cluster
            .clone()
            .ok_or_else(|| Error::Config("no Postgres cluster found; set PG_CLUSTER=\"15 main\"".into()))
    }

    /// Starts `which` and waits until it takes connections; clears its mark only then.
    fn start(&self, which: Which) -> Result<()> {
        let command = match which {
            Which::RabbitMq => run("rabbitmqctl", &["-q", "start_app"]),
            Which::Postgres => {
                let (version, name) = self.cluster()?;
                run(
                    "pg_ctlcluster",
                    &["--skip-systemctl-redirect", &version, &name, "start"],
                )
            }
        }
        .map(|_| ());
        // "Already running" is an error to pg_ctlcluster; what counts is that it answers.
        let ready = self.wait_ready(which);
        match (command, ready) {
            (_, Ok(())) => {
                self.set_down(which, false);
                Ok(())
            }
            (Err(e), Err(_)) | (Ok(()), Err(e)) => Err(e),
        }
    }

    fn wait_ready(&self, which: Which) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let attempt = match which {
                Which::RabbitMq => txoutbox::broker::connect(&self.amqp_url).map(|(connection, channel)| {
                    let _ = channel.close();
                    let _ = connection.close();
                }),
                Which::Postgres => connect_admin(&self.admin_url).map(|client| {
                    let _ = client.close();
                }),
            };
            match attempt {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::Other(format!(
                        "{} does not take connections {} s after the start: {e}",
                        which.name(),
                        READY_TIMEOUT.as_secs()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn restore_all(&self) {
        let (rabbitmq, postgres) = {
            let state = self.lock();
            (state.rabbitmq_down, state.postgres_down)
        };
        for (down, which) in [(rabbitmq, Which::RabbitMq), (postgres, Which::Postgres)] {
            if down {
                eprintln!("txoutbox-chaos: starting {} again", which.name());
                match self.start(which) {
                    Ok(()) => eprintln!("txoutbox-chaos: {} is up", which.name()),
                    Err(e) => eprintln!(
                        "txoutbox-chaos: cannot start {} again: {e}; START IT BY HAND",
                        which.name()
                    ),
                }
            }
        }
    }

    /// On a signal: kill the children, start the services, drop the databases and queues.
    fn emergency_cleanup(&self) {
        let (children, databases, topologies) = {
            let state = self.lock();
            (
                state.children.clone(),
                state.databases.clone(),
                state.topologies.clone(),
            )
        };
        for (pid, name) in &children {
            let killed = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
            if !killed.is_ok_and(|s| s.success()) {
                eprintln!("txoutbox-chaos: cannot kill {name} (pid {pid})");
            }
        }
        self.restore_all();
        if !databases.is_empty() {
            match connect_admin(&self.admin_url) {
                Ok(mut admin) => {
                    for name in &databases {
                        if let Err(e) = drop_database(&mut admin, name) {
                            eprintln!("txoutbox-chaos: {e}");
                        }
                    }
                }
                Err(e) => eprintln!("txoutbox-chaos: cannot drop the run's databases: {e}"),
            }
        }
        if !topologies.is_empty() {
            match txoutbox::broker::connect(&self.amqp_url) {
                Ok((connection, channel)) => {
                    for topology in &topologies {
                        if let Err(e) = topology.delete(&channel) {
                            eprintln!("txoutbox-chaos: {e}");
                        }
                    }
                    let _ = channel.close();
                    let _ = connection.close();
                }
                Err(e) => eprintln!("txoutbox-chaos: cannot delete the run's queues: {e}"),
            }
        }
    }
}

/// A connection to the maintenance database, with short timeouts.
pub fn connect_admin(admin_url: &str) -> Result<postgres::Client> {
    parse_url(admin_url, Duration::from_secs(30))?
        .connect(NoTls)
        .map_err(|e| Error::db("cannot connect to Postgres", e))
}

/// `PG_CLUSTER` ("15 main"), else the one version under /etc/postgresql with cluster `main`.
fn find_cluster() -> Option<(String, String)> {
    if let Ok(value) = std::env::var("PG_CLUSTER") {
        let mut parts = value.split_whitespace();
        if let (Some(version), Some(name), None) = (parts.next(), parts.next(), parts.next()) {
            return Some((version.to_string(), name.to_string()));
        }
    }
    let versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().join("main").is_dir())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    match versions.as_slice() {
        [version] => Some((version.clone(), "main".into())),
        _ => None,
    }
}

/// True when `program` is an executable file in a directory of `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| is_executable(&dir.join(program))))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Unacknowledged deliveries of `queue` (`rabbitmqctl list_queues`), when it can be asked.
pub fn unacked_deliveries(queue: &str) -> Option<u64> {
    if !on_path("rabbitmqctl") {
        return None;
    }
    let output = run(
        "rabbitmqctl",
        &[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ],
    )
    .ok()?;
    output.lines().find_map(|line| {
        let (name, unacked) = line.split_once('\t')?;
        (name == queue).then(|| unacked.trim().parse().ok())?
    })
}

/// Runs a command to its end (killed after [`COMMAND_TIMEOUT`]); its stdout, or an error with
/// its output when it fails.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let shown = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Other(format!("cannot run {shown}: {e}")))?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Other(format!(
                    "{shown} did not finish within {} s",
                    COMMAND_TIMEOUT.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(Error::Other(format!("cannot wait for {shown}: {e}"))),
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|e| Error::Other(format!("cannot read the output of {shown}: {e}")))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let text = String::from_utf8_lossy(&output.stderr).to_string() + &String::from_utf8_lossy(&output.stdout);
    Err(Error::Other(format!(
        "{shown} failed ({}): {}",
        output.status,
        text.trim()
    )))
}
