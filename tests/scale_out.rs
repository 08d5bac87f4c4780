//! Replicas behind a real router: three `sluice serve` processes on loopback behind LiteLLM's
//! proxy (PyPI `litellm[proxy]`, least-busy routing, retries), driven by two `sluice bench`
//! runs at once (whole responses, which the router may retry, and streams, which it cannot
//! once they began). One replica is killed with SIGKILL mid-run and later restarted on its
//! port. What must hold (issue 23):
//! * every whole-response request succeeds (the router retried those the dead replica lost);
//! * a stream that was on the dead replica ends with an in-band error event, and no stream
//!   hangs (none times out, none ends without `[DONE]` or an error);
//! * the two survivors keep serving, and a 2 s window soon completes 80% of what three did
//!   (the three share this machine's cores, so two can do nearly the same work); their rate
//!   against the three's is printed, asserted only at 0.3× (a few requests a second are noisy);
//! * the restarted replica, once `/health/ready` passes, serves requests again.
//!
//! The figures (requests failed, time to recover, time to rejoin) are printed as one JSON line
//! and recorded in `docs/scale-out.md`.

use crate::api_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use api_support::{bench_serve, metric, metrics, probe_status, venv::pip_venv, Server};
use serde_json::{json, Value};

/// The proxy under test, pinned (its dependencies resolve at install time).
const LITELLM: &str = "litellm[proxy]==1.108.7";
/// LiteLLM refuses to start without a master key of some strength.
const MASTER_KEY: &str = "sk-sluice-scale-out-0123456789abcdef0123456789abcdef";
/// Seconds each bench runs; the kill and the restart fall inside.
const RUN_S: f64 = 36.0;
const KILL_AT_S: f64 = 10.0;
const RESTART_AT_S: f64 = 20.0;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("an address").port()
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs_f64()
        * 1e3
}

/// One replica on `port`, one core of its own to ask for (three share this machine).
fn replica(port: u16) -> Server {
    Server::start(&["--port", &port.to_string(), "--threads", "1"])
}

async fn wait_ready(server: &Server) {
    let start = Instant::now();
    while probe_status(server, "/health/ready").await != 200 {
        assert!(start.elapsed() < Duration::from_secs(120), "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The LiteLLM proxy in front of `ports`; killed when dropped.
struct Proxy {
    child: Child,
    url: String,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// LiteLLM's proxy config: one deployment per replica under one model name, least-busy
/// routing; a failed call is retried on another deployment, and a replica that failed is
/// left out for `cooldown_time` seconds, then tried again.
fn proxy_config(ports: &[u16]) -> String {
    let mut s = String::from("model_list:\n");
    for p in ports {
        s += &format!(
            "  - model_name: smollm2\n    litellm_params:\n      model: openai/smollm2\n      \
             api_base: http://127.0.0.1:{p}/v1\n      api_key: none\n"
        );
    }
    s += "router_settings:\n  routing_strategy: least-busy\n  num_retries: 3\n  \
          allowed_fails: 0\n  cooldown_time: 5\n";
    s += &format!("general_settings:\n  master_key: {MASTER_KEY}\n");
    s
}

async fn start_proxy(dir: &Path, ports: &[u16]) -> Proxy {
    let venv = pip_venv("test-venv-litellm", LITELLM);
    let config = dir.join("litellm.yaml");
    std::fs::write(&config, proxy_config(ports)).expect("writing the proxy config");
    let port = free_port();
    let log = std::fs::File::create(dir.join("litellm.log")).expect("a log file");
    // Through the interpreter: the venv's console scripts name the temporary path it was
    // built under (`pip_venv` renames it into place).
    let child = Command::new(venv.join("bin/python"))
        .args(["-m", "litellm.proxy.proxy_cli", "--config"])
        .arg(&config)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        // The model price map ships in the package; never fetch it.
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("a log handle"))
        .stderr(log)
        .spawn()
        .expect("starting litellm");
    let proxy = Proxy {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let client = api_support::client();
    let start = Instant::now();
    loop {
        let up = client
            .get(format!("{}/health/liveliness", proxy.url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up {
            return proxy;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "litellm did not start: {}",
            std::fs::read_to_string(dir.join("litellm.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A `sluice bench serve` run against the proxy, in the background.
fn bench(proxy: &Proxy, out: &Path, extra: &[&str]) -> Child {
    bench_serve(&proxy.url, "smollm2", out)
        .args(["--api-key", MASTER_KEY, "--endpoint", "completions"])
        .args(["--duration", &RUN_S.to_string(), "--warmup-requests", "0"])
        .args(["--timeout", "60", "--input-len", "32"])
        .args(extra)
        .spawn()
        .expect("starting sluice bench")
}

fn finish(mut child: Child, out: &Path) -> Value {
    let status = child.wait().expect("waiting for the bench");
    assert!(status.success(), "sluice bench failed: {status}");
    serde_json::from_slice(&std::fs::read(out).expect("the bench's result")).expect("JSON")
}

/// Each request's completion time, in Unix milliseconds, of those that succeeded.
fn completions(result: &Value) -> Vec<f64> {
    let origin = result["origin_unix_ms"].as_f64().expect("origin_unix_ms");
    result["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .filter(|r| r["error"].is_null())
        .map(|r| origin + 1e3 * (r["start_s"].as_f64().unwrap() + r["e2e_s"].as_f64().unwrap()))
        .collect()
}

fn count_in(times: &[f64], from: f64, to: f64) -> usize {
    times.iter().filter(|&&t| t >= from && t < to).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_behind_litellm_survive_a_sigkill() {
    let dir: PathBuf = std::env::temp_dir().join(format!("sluice-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut replicas: Vec<Option<Server>> = ports.iter().map(|&p| Some(replica(p))).collect();
    for r in replicas.iter().flatten() {
        wait_ready(r).await;
    }
    let proxy = start_proxy(&dir, &ports).await;

    let (whole_out, stream_out) = (dir.join("whole.json"), dir.join("stream.json"));
    let started = Instant::now();
    let whole = bench(
        &proxy,
        &whole_out,
        &["--no-stream", "--concurrency", "3", "--output-len", "16"],
    );
    let streams = bench(
        &proxy,
        &stream_out,
        &["--concurrency", "6", "--output-len", "256", "--seed", "1"],
    );
    let at = |s: f64| started + Duration::from_secs_f64(s);

    tokio::time::sleep_until(at(KILL_AT_S).into()).await;
    // The busiest replica: with six long streams spread by least-busy routing, it holds
    // some of them.
    let mut running = Vec::new();
    for r in replicas.iter().flatten() {
        running.push(metric(&metrics(r).await, "vllm:num_requests_running"));
    }
    let victim = (0..running.len())
        .max_by(|&a, &b| running[a].total_cmp(&running[b]))
        .expect("three replicas");
    let killed_at = unix_ms();
    drop(replicas[victim].take()); // SIGKILL
    tokio::time::sleep_until(at(RESTART_AT_S).into()).await;
    let restarted_at = unix_ms();
    let back = replica(ports[victim]);
    wait_ready(&back).await;
    let ready_at = unix_ms();
    // Rejoined: the router sends it work again once its cool-down ends. (The count starts at
    // the version's own warm-up request.)
    let served = |text: String| metric(&text, "vllm:request_success_total");
    let warm_up = served(metrics(&back).await);
    let mut rejoined_at = None;
    while started.elapsed().as_secs_f64() < RUN_S {
        if served(metrics(&back).await) > warm_up {
            rejoined_at = Some(unix_ms());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let whole = finish(whole, &whole_out);
    let streams = finish(streams, &stream_out);
    // Not tried again before the load ended (the router's cool-down restarts at each failed
    // try, so the last one may end late): more requests through the router, 20 s at most.
    // Many at once: least-busy routing counts each deployment's calls in flight, and the
    // calls the kill cut stay counted against the restarted replica (LiteLLM keeps the count
    // for an hour), so it is picked only once the survivors hold more (ties go to the first).
    let client = api_support::client();
    let deadline = Instant::now() + Duration::from_secs(20);
    while rejoined_at.is_none() && Instant::now() < deadline {
        let body = json!({"model": "smollm2", "prompt": "Hello", "max_tokens": 4});
        let sends = (0..18).map(|_| {
            (client.post(format!("{}/v1/completions", proxy.url)))
                .bearer_auth(MASTER_KEY)
                .json(&body)
                .send()
        });
        let _ = futures::future::join_all(sends).await;
        if served(metrics(&back).await) > warm_up {
            rejoined_at = Some(unix_ms());
        }
    }

    // Whole responses: the router retried every one the dead replica lost.
    let ws = &whole["summary"];
    assert_eq!(ws["num_failed"], 0, "{}", whole["error_samples"]);
    // Streams: one cut by the kill ends with the router's error event; one the router sent
    // to the dead replica before it noticed gets an error status (LiteLLM does not retry a
    // stream that failed to start). Never a hang, a cut without an error, or a broken chunk.
    let errors = streams["summary"]["errors"].as_object().expect("errors");
    let count = |kind: &str| errors.get(kind).and_then(Value::as_u64).unwrap_or(0);
    for (kind, n) in errors {
        assert!(
            kind == "in_band" || kind.starts_with("http_5"),
            "{n} streams failed as {kind}: {}",
            streams["error_samples"]
        );
    }
    let streams_cut = count("in_band");
    let stream_failures: u64 = errors.values().filter_map(Value::as_u64).sum();
    assert!(
        streams_cut > 0,
        "no stream was cut by the kill (running per replica: {running:?})"
    );

    // Throughput before the kill (three replicas) and on the survivors until the restart.
    let done = completions(&whole);
    let before_s = KILL_AT_S - 2.0;
    let before = count_in(&done, killed_at - before_s * 1e3, killed_at) as f64 / before_s;
    let window_ms = 2000.0;
    let recovered_at = (0..)
        .map(|i| killed_at + 250.0 * i as f64)
        .take_while(|t| t + window_ms <= restarted_at)
        .find(|&t| count_in(&done, t, t + window_ms) as f64 >= 0.8 * before * window_ms / 1e3);
    let survivors_s = (restarted_at - killed_at) / 1e3 - 2.0;
    let survivors = count_in(&done, killed_at + 2e3, restarted_at) as f64 / survivors_s;
    let figures = json!({
        "whole_requests": ws["num_completed"],
        "whole_failed": ws["num_failed"],
        "whole_e2e_max_s": ws["e2e_ms"]["max"].as_f64().map(|m| m / 1e3),
        "streams": streams["summary"]["num_completed"].as_u64().unwrap_or(0) + stream_failures,
        "streams_cut_in_band": streams_cut,
        "streams_refused_before_start": stream_failures - streams_cut,
        "running_per_replica_at_kill": running,
        "whole_per_s_before_kill": before,
        "whole_per_s_on_survivors": survivors,
        "recovered_after_s": recovered_at.map(|t| (t - killed_at) / 1e3),
        "restart_to_ready_s": (ready_at - restarted_at) / 1e3,
        "ready_to_first_served_s": rejoined_at.map(|t| (t - ready_at) / 1e3),
    });
    println!("scale-out figures: {figures}");
    assert!(
        before > 0.0,
        "no requests completed before the kill: {figures}"
    );
    // The survivors keep serving. How much of the three's throughput they give is a figure
    // (`docs/scale-out.md`), not asserted: a few requests a second, routed by a proxy that may
    // put every stream on one replica, vary by more than half from run to run on 2 cores.
    assert!(
        survivors >= 0.3 * before,
        "throughput did not recover on the survivors: {figures}"
    );
    assert!(recovered_at.is_some(), "{figures}");
    assert!(
        rejoined_at.is_some(),
        "the restarted replica got no requests: {figures}"
    );
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}
