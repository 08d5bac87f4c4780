//! Shared by the `api_*` integration tests: a `sluice serve` child process on an ephemeral
//! port (killed on drop), the Python virtual environment with the official `openai` package,
//! and small HTTP helpers.
#![allow(dead_code)]

#[path = "../venv/mod.rs"]
pub mod venv;

#[path = "../common/metrics.rs"]
mod metrics;
#[allow(unused_imports)]
pub use metrics::{assert_no_leaks, idle, metric, IDLE_WITHIN};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `openai` package the Python tests run against.
pub const OPENAI_VERSION: &str = "3.22.1";
pub const API_KEY: &str = "test-key-123";

/// The `sluice` binary under test: `$SLUICE_BIN` when set (e.g. a release build, or a copy
/// kept apart from a target directory that others build into), else Cargo's.
pub fn sluice_bin() -> PathBuf {
    std::env::var_os("SLUICE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sluice")))
}

/// `sluice bench serve` aimed at `url` and `model`, writing its result file to `output`,
/// without its progress bar or its report on stdout; callers add the workload.
pub fn bench_serve(url: &str, model: &str, output: &Path) -> Command {
    let mut cmd = Command::new(sluice_bin());
    cmd.args(["bench", "serve", "--base-url", url, "--model", model])
        .arg("--no-progress")
        .arg("--output")
        .arg(output)
        .stdout(Stdio::null());
    cmd
}

/// A running `sluice serve`; killed when dropped.
pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub model: String,
}

impl Server {
    /// Starts the server with the default model (unless `extra` names models) on 127.0.0.1,
    /// port 0 (unless `extra` names one), small KV cache and context, plus `extra` flags (which replace a default of the
    /// same flag); waits for the "listening" line.
    pub fn start(extra: &[&str]) -> Server {
        let model = sluice::assets::default_model_path().expect("the default model");
        let mut cmd = Command::new(sluice_bin());
        cmd.args(["serve", "--host", "127.0.0.1"]);
        for (flag, value) in [
            ("--port", "0"),
            ("--threads", "2"),
            ("--kv-cache-memory", "134217728"),
            ("--max-model-len", "1024"),
        ] {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        // Tests that name their models (`--model NAME=PATH`, `--models FILE`) get only those.
        if !extra.iter().any(|a| *a == "--model" || *a == "--models") {
            cmd.arg("--model").arg(&model);
        }
        cmd.args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawning sluice serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("sluice listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let mut server = Server {
            child: Some(child),
            url: String::new(),
            model: sluice::assets::SERVED_NAME.into(),
        };
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => server.url = url,
            Err(_) => panic!("sluice serve did not print its address within 120 s"),
        }
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Sends SIGTERM.
    pub fn signal_term(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
    }

    /// Waits (at most `within`) for the server to exit, and returns its status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("a running server");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("waiting for the server") {
                self.child = None;
                return status;
            }
            assert!(
                start.elapsed() < within,
                "the server did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The Python interpreter of `<cache>/test-venv`, created once with the pinned `openai`.
pub fn venv_python() -> PathBuf {
    let python = venv::pip_venv("test-venv", &format!("openai=={OPENAI_VERSION}"))
        .join("bin")
        .join("python");
    assert!(python.exists(), "no interpreter at {}", python.display());
    python
}

/// Runs `tests/python/<script>` against the server at `url` (served under the default model's name, `smollm2`); panics with
/// its output when it fails.
pub fn run_python(script: &str, url: &str, env: &[(&str, &str)]) -> String {
    run_python_with(&venv_python(), script, url, env)
}

/// `run_python` with another interpreter (a venv with other packages).
pub fn run_python_with(python: &Path, script: &str, url: &str, env: &[(&str, &str)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let out = Command::new(python)
        .arg(&path)
        .env("SLUICE_URL", url)
        .env("SLUICE_MODEL", sluice::assets::SERVED_NAME)
        .env("SLUICE_API_KEY", API_KEY)
        .envs(env.iter().copied())
        .output()
        .expect("running python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("an HTTP client")
}

/// A POST with the test API key and a JSON body.
pub fn post(url: &str, body: &serde_json::Value) -> reqwest::RequestBuilder {
    client()
        .post(url)
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(body.to_string())
}

/// POSTs `body` (with the test API key) and returns the JSON answer, whatever its status.
pub async fn post_json(url: &str, body: &serde_json::Value) -> serde_json::Value {
    post(url, body)
        .send()
        .await
        .expect("a response")
        .json()
        .await
        .expect("a JSON body")
}

/// `GET /health`'s status code.
pub async fn health_status(server: &Server) -> u16 {
    probe_status(server, "/health").await
}

/// The status code of a probe (`/health`, `/health/live`, `/health/ready`).
pub async fn probe_status(server: &Server, path: &str) -> u16 {
    client()
        .get(format!("{}{path}", server.url))
        .send()
        .await
        .expect("GET a probe")
        .status()
        .as_u16()
}

pub async fn metrics(server: &Server) -> String {
    client()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

/// Polls `/metrics` until `pred` holds, for at most `within`.
pub async fn wait_for_metrics(
    server: &Server,
    within: Duration,
    pred: impl Fn(&str) -> bool,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let text = metrics(server).await;
        if pred(&text) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            return Err(text);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The leak check against a server: waits (up to [`IDLE_WITHIN`]) for nothing to be running
/// or waiting, then requires every KV block free and no accounting error.
pub async fn assert_idle_without_leaks(server: &Server) {
    match wait_for_metrics(server, IDLE_WITHIN, idle).await {
        Ok(_) => {}
        Err(text) => panic!("the server did not go idle within {IDLE_WITHIN:?}:\n{text}"),
    }
    assert_no_leaks(&metrics(server).await);
}
