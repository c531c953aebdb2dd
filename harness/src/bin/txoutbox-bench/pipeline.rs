//! The release binaries under HTTP load, from POST to `COMPLETED`: (3) HTTP throughput and (5)
//! end-to-end throughput at C connections, (7) peak RSS after a run at 64 connections, and (8)
//! two servers and two consumers on one database and queue.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use txoutbox::{Error, Result};

use crate::ceilings::Throughput;
use crate::cpu::Snapshot;
use crate::infra::{FreshDb, Infra};
use crate::load::{closed_loop, LoadOutcome};
use crate::options::{Plan, MEMORY_CONNECTIONS};
use crate::process::{peak_rss_bytes, wait_consuming, Kind, Launcher, Process};
use crate::profile::{Perf, Profiles};
use crate::sampler::Sampler;
use crate::statements::{Counter, Statements};
use crate::verify::{self, Checks};
use crate::Progress;
use txoutbox_harness::support::process::free_port;

/// Phase name of (3), (5) and (7).
pub const HTTP_PHASE: &str = "HTTP and end to end";
/// Phase name of (8).
pub const SCALE_PHASE: &str = "scale-out";

/// What (3), (5) and (7) measured.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// Accepted POSTs per second at C connections; its lines are the whole run.
    pub http: Throughput,
    /// Orders per second from the first POST to the last `COMPLETED`.
    pub e2e: Throughput,
    /// Peak RSS after the 64-connection run.
    pub memory: Memory,
    /// Statements and round trips per order over the window of (3), counted by Postgres.
    pub statements: Statements,
    /// CPU profiles of the server and the consumer under the same load.
    pub profiles: Profiles,
}

/// Peak resident memory of the processes.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    /// Connections of the run before the reading.
    pub connections: usize,
    /// `txoutbox-server`'s VmHWM, bytes.
    pub server_peak_rss: u64,
    /// `txoutbox-consumer`'s VmHWM, bytes.
    pub consumer_peak_rss: u64,
}

/// What (8) measured.
#[derive(Clone, Debug, Default)]
pub struct ScaleOut {
    /// Accepted POSTs per second, both servers together.
    pub http: Throughput,
    /// Orders per second from the first POST to the last `COMPLETED`.
    pub e2e: Throughput,
    /// Orders each server accepted.
    pub per_server: Vec<usize>,
}

/// A closed-loop load and what it took to complete.
pub struct Measured {
    /// The orders sent.
    pub load: LoadOutcome,
    /// Accepted POSTs per second.
    pub http: Throughput,
    /// First POST to last `COMPLETED`.
    pub e2e: Throughput,
}

/// (3), (5) and (7): one server and one consumer.
pub fn single(
    infra: &Infra,
    launcher: &Launcher,
    plan: &Plan,
    stop: &AtomicBool,
    checks: &mut Checks,
    progress: &Progress,
) -> Result<Pipeline> {
    let fresh = infra.fresh_db("http", 2)?;
    let broker = infra.fresh_broker("http")?;
    let addr = local_addr()?;
    // Declared before the processes, so that its roles are dropped after they are killed.
    let mut counter = Counter::prepare(infra, &fresh);
    let (server_url, consumer_url) = match &counter {
        Ok(c) => (fresh.url_as(&c.roles.server), fresh.url_as(&c.roles.consumer)),
        Err(_) => (fresh.url.clone(), fresh.url.clone()),
    };
    let mut server = launcher.spawn_at(Kind::Server, "http-server", &server_url, &broker, Some(addr))?;
    let mut consumer = launcher.spawn_at(Kind::Consumer, "http-consumer", &consumer_url, &broker, None)?;
    server.wait_listening(addr)?;
    wait_consuming(&broker, 1, &mut [&mut server, &mut consumer])?;
    let urls = [format!("http://{addr}")];

    let pids: Vec<u32> = [server.id(), consumer.id()].into_iter().flatten().collect();
    let mut segments_before = None;
    if let Ok(c) = counter.as_mut() {
        if let Err(e) = c.reset() {
            counter = Err(e.to_string());
        } else {
            segments_before = Some(c.segments(&pids));
        }
    }
    let measured = measure(&fresh, &urls, plan.concurrency, plan.http, plan, stop)?;
    let statements = match counter.as_mut() {
        Ok(c) => {
            let segments_after = c.segments(&pids);
            match c.read(measured.load.ids.len() as u64) {
                Ok(mut counted) => {
                    match (segments_before, segments_after) {
                        (Some(Ok(before)), Ok(after)) => {
                            for (name, pid) in ["server", "consumer"].into_iter().zip(&pids) {
                                let sent = after.get(pid).copied().unwrap_or(0);
                                let earlier = before.get(pid).copied().unwrap_or(0);
                                counted.round_trips.push((name, sent.saturating_sub(earlier)));
                            }
                        }
                        (Some(Err(e)), _) | (_, Err(e)) => {
                            counted.notes.push(format!("round trips not counted: {e}"))
                        }
                        (None, _) => {}
                    }
                    Statements::Counted(counted)
                }
                Err(e) => Statements::Unavailable(e.to_string()),
            }
        }
        Err(reason) => Statements::Unavailable(reason.clone()),
    };
    for service in [&mut server, &mut consumer] {
        service.check_alive()?;
    }
    let mut ids = measured.load.ids.clone();
    let mut errors = measured.load.errors;
    let mut error_samples = measured.load.error_samples.clone();

    progress.step(&format!(
        "{HTTP_PHASE}: {} connections for {} s more, CPU profiles of the server and the consumer",
        plan.concurrency,
        plan.profile.as_secs()
    ));
    let (profiles, more) = profile(
        &urls,
        plan,
        &[("server", &server), ("consumer", &consumer)],
        &launcher.run_dir().join("profile"),
        stop,
    )?;
    if let Profiles::Unavailable(reason) = &profiles {
        progress.step(&format!("{HTTP_PHASE}: no CPU profile: {reason}"));
    }
    ids.extend(more.ids);
    errors += more.errors;
    error_samples.extend(more.error_samples);

    if plan.concurrency != MEMORY_CONNECTIONS {
        progress.step(&format!(
            "{HTTP_PHASE}: {MEMORY_CONNECTIONS} connections for {} s, for peak RSS",
            plan.memory.as_secs()
        ));
        let counter = AtomicU64::new(0);
        let more = closed_loop(&urls, MEMORY_CONNECTIONS, plan.memory, &counter, stop)?;
        ids.extend(more.ids);
        errors += more.errors;
        error_samples.extend(more.error_samples);
        let mut client = fresh.client()?;
        verify::wait_until_completed(&mut client, ids.len() as u64, plan.completion_timeout, stop)?;
    }
    interrupted(stop)?;
    let memory = Memory {
        connections: MEMORY_CONNECTIONS,
        server_peak_rss: peak_rss_bytes(&server)?,
        consumer_peak_rss: peak_rss_bytes(&consumer)?,
    };
    let mut client = fresh.client()?;
    verify::orders_done_once(
        HTTP_PHASE,
        &mut client,
        &broker,
        &ids,
        errors,
        &error_samples,
        checks,
    )?;
    Ok(Pipeline {
        http: measured.http,
        e2e: measured.e2e,
        memory,
        statements,
        profiles,
    })
}

/// (8): two servers and two consumers on one database and queue, the connections split evenly
/// between the servers.
pub fn scale_out(
    infra: &Infra,
    launcher: &Launcher,
    plan: &Plan,
    stop: &AtomicBool,
    checks: &mut Checks,
) -> Result<ScaleOut> {
    let fresh = infra.fresh_db("scaleout", 2)?;
    // Competing consumers: each order has one event, so no aggregate's order is at stake, and
    // with a single active consumer the second would only stand by.
    let broker = infra.fresh_broker_with("scaleout", false)?;
    let mut services: Vec<Process> = Vec::new();
    let mut urls = Vec::new();
    for n in 1..=2 {
        let addr = local_addr()?;
        let mut server = launcher.spawn(
            Kind::Server,
            &format!("scaleout-server-{n}"),
            &fresh,
            &broker,
            Some(addr),
        )?;
        server.wait_listening(addr)?;
        services.push(server);
        urls.push(format!("http://{addr}"));
    }
    for n in 1..=2 {
        services.push(launcher.spawn(
            Kind::Consumer,
            &format!("scaleout-consumer-{n}"),
            &fresh,
            &broker,
            None,
        )?);
    }
    wait_consuming(&broker, 2, &mut services.iter_mut().collect::<Vec<_>>())?;

    let connections = plan.concurrency.max(2);
    let measured = measure(&fresh, &urls, connections, plan.scale_out, plan, stop)?;
    for service in &mut services {
        service.check_alive()?;
    }
    let load = &measured.load;
    let mut client = fresh.client()?;
    verify::orders_done_once(
        SCALE_PHASE,
        &mut client,
        &broker,
        &load.ids,
        load.errors,
        &load.error_samples,
        checks,
    )?;
    checks.add(
        SCALE_PHASE,
        "both servers took orders",
        load.per_target.iter().all(|&n| n > 0),
        format!("{:?}", load.per_target),
    );
    Ok(ScaleOut {
        http: measured.http,
        e2e: measured.e2e,
        per_server: load.per_target.clone(),
    })
}

/// A closed loop on `urls`, then a wait until every accepted order is `COMPLETED`; samples
/// accepted and completed orders per second throughout.
pub fn measure(
    fresh: &FreshDb,
    urls: &[String],
    connections: usize,
    duration: Duration,
    plan: &Plan,
    stop: &AtomicBool,
) -> Result<Measured> {
    let accepted = Arc::new(AtomicU64::new(0));
    let sampler = order_sampler(fresh, accepted.clone(), plan.sample_interval)?;
    let started = Instant::now();
    let before = Snapshot::take();
    let load = closed_loop(urls, connections, duration, &accepted, stop)?;
    let cpu = before.until(&Snapshot::take());
    let mut client = fresh.client()?;
    verify::wait_until_completed(&mut client, load.ids.len() as u64, plan.completion_timeout, stop)?;
    let observed = started.elapsed();
    let lines = sampler.finish();
    interrupted(stop)?;
    let last = verify::last_completed_epoch(&mut client, &load.ids)?;
    let e2e_elapsed = end_to_end(&load, last, observed);
    let http = Throughput::new(load.ids.len() as u64, load.elapsed, lines).with_cpu(cpu);
    let e2e = Throughput::new(load.ids.len() as u64, e2e_elapsed, Vec::new());
    Ok(Measured { load, http, e2e })
}

/// The closed loop of (3) for `plan.profile` more, with perf recording each of `processes`
/// once every connection is sending. Returns the profiles (or why there are none) and the
/// orders sent, which the scenario verifies with its others.
fn profile(
    urls: &[String],
    plan: &Plan,
    processes: &[(&'static str, &Process)],
    dir: &Path,
    stop: &AtomicBool,
) -> Result<(Profiles, LoadOutcome)> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Other(format!("cannot create {}: {e}", dir.display())))?;
    let perf = Perf::detect(dir);
    let accepted = AtomicU64::new(0);
    // A little longer than the recording, which starts once the connections are busy.
    let duration = plan.profile + Duration::from_secs(2);
    std::thread::scope(|scope| -> Result<(Profiles, LoadOutcome)> {
        let load = std::thread::Builder::new()
            .name("bench-profile-load".into())
            .spawn_scoped(scope, || {
                closed_loop(urls, plan.concurrency, duration, &accepted, stop)
            })
            .map_err(|e| Error::Other(format!("cannot start the profile load: {e}")))?;
        let profiles = match perf {
            Err(reason) => Profiles::Unavailable(reason),
            Ok(perf) => {
                // Every connection has had answers: its server thread exists, and is recorded.
                let busy = 2 * plan.concurrency as u64;
                let deadline = Instant::now() + Duration::from_secs(10);
                while accepted.load(Ordering::Relaxed) < busy
                    && Instant::now() < deadline
                    && !load.is_finished()
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                record(&perf, processes, plan.profile, dir)
            }
        };
        let outcome = load
            .join()
            .map_err(|_| Error::Other("the profile load panicked".into()))??;
        Ok((profiles, outcome))
    })
}

/// Records each process for `window` at once, then renders them.
fn record(perf: &Perf, processes: &[(&'static str, &Process)], window: Duration, dir: &Path) -> Profiles {
    let mut recordings = Vec::new();
    for (name, process) in processes {
        let Some(pid) = process.id() else {
            return Profiles::Unavailable(format!("the {name} is not running"));
        };
        match perf.record(pid, window, &dir.join(format!("{name}.perf.data"))) {
            Ok(recording) => recordings.push((*name, recording)),
            Err(reason) => return Profiles::Unavailable(reason),
        }
    }
    let mut profiles = Vec::new();
    for (name, recording) in recordings {
        match recording.finish(name, dir) {
            Ok(profile) => profiles.push(profile),
            Err(reason) => return Profiles::Unavailable(reason),
        }
    }
    Profiles::Recorded {
        event: perf.event().to_string(),
        seconds: window.as_secs_f64(),
        profiles,
    }
}

/// First POST to last `COMPLETED`: by Postgres' clock (`max(updated_at)`) against the wall
/// clock at the start, or as observed by polling when the two disagree.
fn end_to_end(load: &LoadOutcome, last_completed: Option<f64>, observed: Duration) -> Duration {
    let started = load
        .started_wall
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64());
    match (started, last_completed) {
        (Some(start), Some(last)) if last > start && last - start <= observed.as_secs_f64() => {
            Duration::from_secs_f64(last - start)
        }
        _ => observed,
    }
}

/// Samples accepted orders (`accepted`) and `COMPLETED` orders (Postgres) per interval.
pub fn order_sampler(fresh: &FreshDb, accepted: Arc<AtomicU64>, interval: Duration) -> Result<Sampler> {
    let mut client = fresh.client()?;
    Sampler::start(&["accepted", "completed"], interval, move || {
        Ok(vec![
            accepted.load(Ordering::Relaxed),
            verify::completed_orders(&mut client)?,
        ])
    })
}

/// An error when the run was interrupted.
pub fn interrupted(stop: &AtomicBool) -> Result<()> {
    if stop.load(Ordering::Relaxed) {
        Err(Error::Other("interrupted".into()))
    } else {
        Ok(())
    }
}

fn local_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}
