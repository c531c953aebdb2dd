//! What an embedder's build pulls in: no HTTP server, logger, signal handling or load generator.

use std::process::Command;

#[test]
fn the_library_pulls_in_no_server_logger_or_signal_crates() {
    let tree = |args: &[&str]| {
        let output = Command::new(env!("CARGO"))
            .args(["tree", "-p", "txoutbox", "--prefix", "none"])
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo tree runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let all = tree(&["-e", "normal"]);
    for banned in [
        "tiny_http",
        "env_logger",
        "signal-hook",
        "txoutbox-service",
        "txoutbox-harness",
    ] {
        assert!(
            !all.lines().any(|l| l.starts_with(&format!("{banned} "))),
            "{banned} in:\n{all}"
        );
    }
    // socket2 comes with tokio inside the postgres driver; the library itself must not add it.
    let direct = tree(&["-e", "normal", "--depth", "1"]);
    assert!(
        !direct.lines().any(|l| l.starts_with("socket2 ")),
        "socket2 is a direct dependency:\n{direct}"
    );
    // The example service turns it on for exact amounts; the library must not impose it.
    let features = tree(&["-e", "features", "-i", "serde_json"]);
    assert!(!features.contains("arbitrary_precision"), "{features}");
}
