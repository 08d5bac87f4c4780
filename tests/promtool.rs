//! The shipped alert rules and Grafana dashboard, held against `promtool` and a real server:
//! the rules parse and pass their unit tests, every dashboard query parses, every metric they
//! name is one the server exports, and the server's `/metrics` passes `promtool check metrics`.
//!
//! `promtool` comes from Debian's `prometheus` package (`apt-get download`, unpacked under
//! the cache directory once; no root needed).

use crate::api_support;
use crate::common::debian;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use api_support::{metrics, venv::cache_dir, Server};
use debian::debian_binary;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `<cache>/promtool/promtool`, from Debian's `prometheus` package the first time (once per
/// test process).
fn promtool() -> PathBuf {
    static PROMTOOL: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PROMTOOL
        .get_or_init(|| {
            debian_binary(
                cache_dir().join("promtool"),
                "prometheus",
                "usr/bin/promtool",
            )
        })
        .clone()
}

fn promtool_ok(args: &[&str], stdin: Option<&str>) -> String {
    let (ok, text) = promtool_run(args, stdin);
    assert!(ok, "promtool {args:?} failed:\n{text}");
    text
}

/// promtool's exit status and its output.
fn promtool_run(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(promtool());
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("running promtool");
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every `sluice:` metric a query names, less a histogram's series suffix.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in expr.match_indices("sluice:") {
        let name: String = expr[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_string();
        out.push(base);
    }
    out
}

fn alert_exprs(rules: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(rules).unwrap();
    // The rules file's `expr:` values, single-line or block (`|`).
    let mut exprs = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        if rest.trim() == "|" {
            let mut block = String::new();
            while lines.peek().is_some_and(|l| l.starts_with("          ")) {
                block.push_str(lines.next().unwrap().trim());
                block.push(' ');
            }
            exprs.push(block);
        } else {
            exprs.push(rest.trim().to_string());
        }
    }
    exprs
}

#[test]
fn alert_rules_parse_and_pass_their_unit_tests() {
    let dir = repo().join("deploy/prometheus");
    let out = promtool_ok(
        &["check", "rules", dir.join("alerts.yaml").to_str().unwrap()],
        None,
    );
    assert!(out.contains("10 rules found"), "{out}");
    promtool_ok(
        &[
            "test",
            "rules",
            dir.join("alerts.test.yaml").to_str().unwrap(),
        ],
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rules_name_what_the_server_exports() {
    let server = Server::start(&[]);
    // One request, so the histograms have series.
    let resp = api_support::post(
        &format!("{}/v1/completions", server.url),
        &serde_json::json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 2}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let text = metrics(&server).await;
    // The exposition parses, and the only lints are vLLM's naming, which sluice keeps so the
    // tools operators run read it: the colon in every name, and vLLM's histogram
    // `iteration_tokens_total`.
    let (_, lint) = promtool_run(&["check", "metrics"], Some(&text));
    let vllm_naming = |l: &str| {
        l.ends_with("metric names should not contain ':'")
            || l.starts_with("sluice:iteration_tokens_total non-counter")
            || l.starts_with("vllm:iteration_tokens_total non-counter")
    };
    let problems: Vec<&str> = lint
        .lines()
        .filter(|l| !l.trim().is_empty() && !vllm_naming(l))
        .collect();
    assert!(
        problems.is_empty(),
        "promtool check metrics:\n{}",
        problems.join("\n")
    );

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/sluice-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 12);
    // Grafana's variables, as Prometheus would receive them.
    let prom: Vec<String> = exprs
        .iter()
        .map(|e| {
            e.replace("$__rate_interval", "5m")
                .replace("$__range", "1h")
                .replace("$model_name", ".*")
        })
        .collect();
    // Every query parses: promtool checks them as recording rules.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in prom.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {e:?}\n"
        ));
    }
    let file = std::env::temp_dir().join(format!("sluice-dash-{}.yml", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    promtool_ok(&["check", "rules", file.to_str().unwrap()], None);
    let _ = std::fs::remove_file(file);

    exprs.extend(alert_exprs(&repo().join("deploy/prometheus/alerts.yaml")));
    for e in &exprs {
        for name in metric_names(e) {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "`{name}` (in `{e}`) is not among the server's metrics"
            );
        }
    }
}
