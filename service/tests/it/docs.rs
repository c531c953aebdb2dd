//! The documentation keeps up with the code: every setting the binaries' `--help` lists is a
//! row of the settings table in docs/operating.md, every metric the code registers is in
//! docs/metrics.md, and every relative link in README.md and docs/ reaches a file (and, with
//! `#anchor`, a heading or `<a id>` of it) that exists.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root: this crate is `service/` in it.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("service/ has a parent")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The settings a binary's `--help` lists: each entry's first line is two spaces, the name.
fn settings_in_help(binary: &str) -> Vec<String> {
    let output = Command::new(binary).arg("--help").output().expect("run --help");
    assert!(output.status.success(), "{binary} --help failed: {output:?}");
    let help = String::from_utf8(output.stdout).expect("UTF-8 help");
    let names: Vec<String> = help
        .lines()
        .filter_map(|line| line.strip_prefix("  ")?.split_whitespace().next())
        .filter(|word| word.len() > 1 && word.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(str::to_string)
        .collect();
    assert!(names.len() >= 6, "{binary} --help lists no settings? {help}");
    names
}

#[test]
fn every_setting_of_the_binaries_is_documented_in_operating() {
    let doc = read(&root().join("docs/operating.md"));
    let mut missing = BTreeSet::new();
    for binary in [
        env!("CARGO_BIN_EXE_txoutbox-server"),
        env!("CARGO_BIN_EXE_txoutbox-consumer"),
    ] {
        for name in settings_in_help(binary) {
            if !doc.contains(&format!("| `{name}` |")) {
                missing.insert(name);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "settings missing from the table in docs/operating.md: {missing:?}"
    );
}

#[test]
fn every_metric_is_documented_in_metrics() {
    let root = root();
    let doc = read(&root.join("docs/metrics.md"));
    let mut registered = BTreeSet::new();
    for source in [
        "src/relay.rs",
        "src/consumer.rs",
        "src/metrics.rs",
        "service/src/metrics.rs",
    ] {
        let text = read(&root.join(source));
        for piece in text.split("\"txoutbox_").skip(1) {
            let name: String = piece
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if piece[name.len()..].starts_with('"') {
                registered.insert(format!("txoutbox_{name}"));
            }
        }
    }
    assert!(
        registered.len() >= 15,
        "found too few metric names: {registered:?}"
    );
    let missing: Vec<_> = registered
        .iter()
        .filter(|name| !doc.contains(&format!("`{name}")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics missing from docs/metrics.md: {missing:?}"
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file: its headings' slugs (with GitHub's `-1`, `-2` for repeats)
/// and its explicit `<a id="...">`.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            let base = slug(line.trim_start_matches('#').trim());
            let mut anchor = base.clone();
            let mut n = 0;
            while found.contains(&anchor) {
                n += 1;
                anchor = format!("{base}-{n}");
            }
            found.insert(anchor);
        }
    }
    let ids = regex::Regex::new(r#"<a id="([^"]+)">"#).expect("regex");
    found.extend(ids.captures_iter(text).map(|c| c[1].to_string()));
    found
}

/// The `[text](target)` links outside code blocks.
fn links(text: &str) -> Vec<String> {
    let link = regex::Regex::new(r"\]\(([^)\s]+)\)").expect("regex");
    let mut in_code = false;
    let mut found = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code {
            found.extend(link.captures_iter(line).map(|c| c[1].to_string()));
        }
    }
    found
}

#[test]
fn every_relative_link_in_readme_and_docs_resolves() {
    let root = root();
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/") {
        let path = entry.expect("docs/ entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let mut broken = Vec::new();
    for file in &files {
        let text = read(file);
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().expect("a file's directory").join(path)
            };
            let ok = resolved.exists()
                && match anchor {
                    None => true,
                    Some(a) => resolved.is_file() && anchors(&read(&resolved)).contains(a),
                };
            if !ok {
                broken.push(format!(
                    "{}: {target}",
                    file.strip_prefix(&root).unwrap_or(file).display()
                ));
            }
        }
    }
    assert!(files.len() > 1, "docs/ holds no Markdown file");
    assert!(broken.is_empty(), "links that lead nowhere: {broken:#?}");
}
