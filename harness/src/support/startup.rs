//! How a harness binary starts: the command line, logging, where the services are and the
//! directory of the run.

use std::path::PathBuf;

use txoutbox::{Error, Result};
use txoutbox_service::config::DEFAULT_AMQP_URL;

use super::timestamp::Timestamp;

/// Default `DATABASE_URL`: any database of the local server; the harness creates its own.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The parsed command line, or `None` when the run ends here: `--help` (`wants_help`) prints
/// `help`; a bad command line is printed and exits with 2. Otherwise starts logging (`warn`
/// unless `RUST_LOG` says otherwise).
pub fn start<O>(
    parsed: std::result::Result<O, String>,
    help: &str,
    wants_help: impl FnOnce(&O) -> bool,
) -> Option<O> {
    let options = match parsed {
        Ok(options) => options,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if wants_help(&options) {
        println!("{help}");
        return None;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    Some(options)
}

/// Where the services are: `DATABASE_URL` and `AMQP_URL`, or their defaults.
pub fn service_urls() -> (String, String) {
    (
        txoutbox_service::settings::env_or("DATABASE_URL", DEFAULT_DATABASE_URL),
        txoutbox_service::settings::env_or("AMQP_URL", DEFAULT_AMQP_URL),
    )
}

/// `<out>/<timestamp>/`, created.
pub fn run_dir(out: PathBuf, timestamp: &Timestamp) -> Result<PathBuf> {
    let dir = out.join(&timestamp.compact);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Other(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}
