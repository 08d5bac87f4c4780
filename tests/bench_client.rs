//! The bench client against an in-process scripted server.
//!
//! The server streams `max_tokens` chunks: the first after `FIRST_MS`, then one every
//! `GAP_MS`, then a usage chunk and `[DONE]`. The prompt names a scenario that breaks the
//! script: `http500`, `inband` (an error chunk after 2 tokens), `drop` (connection cut after
//! 2 tokens), `nodone` (clean end without `[DONE]`), `nousage`, `slow` (2 s before anything),
//! `fast` (no delays). The same scenarios run over the WebSocket endpoint.

mod cli;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde_json::json;
use server::{start_server, FIRST_MS, GAP_MS};
use sluice::bench::client::{CountSource, Driver, ErrorKind, HttpDriver};
use sluice::bench::report::{summarize, Slo, Summary};
use sluice::bench::runner::{run_load, LoadShape, RunOutcome, RunPlan, StopAt};
use sluice::bench::workload::PreparedRequest;
use sluice::bench::ws::WsDriver;
use sluice::bench::Endpoint;

// ---------------------------------------------------------------- helpers

fn request(scenario: &str, max_tokens: u64) -> PreparedRequest {
    PreparedRequest {
        body: json!({"model": "m", "prompt": scenario, "max_tokens": max_tokens, "stream": true})
            .to_string(),
        input_len: None,
    }
}

fn chat_request(scenario: &str, max_tokens: u64) -> PreparedRequest {
    PreparedRequest {
        body: json!({"model": "m", "messages": [{"role": "user", "content": scenario}],
                     "max_tokens": max_tokens, "stream": true})
        .to_string(),
        input_len: None,
    }
}

/// `req` without `stream`: a request for a whole response.
fn unstreamed(mut req: PreparedRequest) -> PreparedRequest {
    let mut body: serde_json::Value = serde_json::from_str(&req.body).unwrap();
    body.as_object_mut().unwrap().remove("stream");
    req.body = body.to_string();
    req
}

fn http(addr: SocketAddr, path: &str, timeout: Duration) -> Arc<Driver> {
    let d = HttpDriver::new(format!("http://{addr}{path}"), None, 16, timeout).unwrap();
    Arc::new(Driver::Http(d))
}

async fn ws(addr: SocketAddr, sockets: usize, endpoint: Endpoint) -> Arc<Driver> {
    let url = format!("ws://{addr}/v1/ws");
    let d = WsDriver::connect(&url, None, sockets, endpoint, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(d.num_sockets(), sockets);
    Arc::new(Driver::Ws(d))
}

fn closed(concurrency: usize, n: usize) -> RunPlan {
    RunPlan {
        shape: LoadShape::Closed { concurrency },
        stop: StopAt::Requests(n),
        warmup_requests: 0,
        seed: 1,
    }
}

async fn run(driver: Arc<Driver>, reqs: Vec<PreparedRequest>, plan: RunPlan) -> RunOutcome {
    run_load(driver, Arc::new(reqs), &plan, ProgressBar::hidden()).await
}

fn summary(o: &RunOutcome) -> Summary {
    summarize(&o.records, o.wall_s, o.client_cpu, Slo::default())
}

/// TTFT within [scripted, scripted + 80 ms]; ITL and TPOT within [GAP − 2, GAP + 15] ms on
/// average (scheduling only ever adds delay, timer rounding may shave a little).
/// The client's figures against the server's script. The lower bounds are the script itself
/// (the server sleeps at least that long, and a client that buffers chunks measures gaps of
/// ~0); the upper bounds leave room for a loaded machine (every figure may come late) while
/// still telling the events apart: a TTFT taken at the last chunk would be the whole
/// response, and an inter-token gap that counted the first-token wait would be several gaps.
fn assert_scripted_timings(s: &Summary, tokens: u64) {
    const SLACK_MS: f64 = 60.0;
    let (first, gap) = (FIRST_MS as f64, GAP_MS as f64);
    let ttft = s.ttft_ms.unwrap();
    assert!(ttft.min >= first - 2.0, "ttft {ttft:?}");
    assert!(ttft.max <= first + 2.0 * SLACK_MS, "ttft {ttft:?}");
    let itl = s.itl_ms.unwrap();
    assert_eq!(itl.count as u64, s.num_completed as u64 * (tokens - 1));
    assert!(
        itl.mean >= gap - 2.0 && itl.mean <= gap + SLACK_MS,
        "itl {itl:?}"
    );
    assert!(
        itl.median >= gap - 2.0 && itl.median <= gap + SLACK_MS,
        "itl {itl:?}"
    );
    let tpot = s.tpot_ms.unwrap();
    assert!(
        tpot.mean >= gap - 2.0 && tpot.mean <= gap + SLACK_MS,
        "tpot {tpot:?}"
    );
    let e2e = s.e2e_ms.unwrap();
    let scripted_e2e = first + gap * (tokens - 1) as f64;
    assert!(
        e2e.min >= scripted_e2e - 5.0 && e2e.max <= scripted_e2e + 4.0 * SLACK_MS,
        "e2e {e2e:?}"
    );
}

/// The most requests in flight at one moment, from the records' start and end times: how
/// concurrency is checked without timing the run.
fn max_in_flight(o: &sluice::bench::runner::RunOutcome) -> usize {
    let mut edges: Vec<(f64, i32)> = o
        .records
        .iter()
        .flat_map(|r| [(r.start_s, 1), (r.start_s + r.e2e_s, -1)])
        .collect();
    // At equal times an end comes before a start.
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_timings_match_the_script() {
    let addr = start_server().await;
    let driver = http(addr, "/v1/completions", Duration::from_secs(5));
    let o = run(driver, vec![request("ok", 10); 8], closed(4, 8)).await;
    let s = summary(&o);
    assert_eq!((s.num_completed, s.num_failed), (8, 0));
    assert_eq!(s.total_output_tokens, 80);
    assert_eq!(s.total_input_tokens, 56);
    assert_eq!(s.num_counted_by_usage, 8);
    assert_scripted_timings(&s, 10);
    // Four at a time, never more: two waves of four.
    assert_eq!(max_in_flight(&o), 4);
    assert!(o.wall_s > 0.7, "wall {}", o.wall_s);
    assert!(s.client_cpu.is_some());
}

/// `--no-stream`: the whole answer's arrival is both its first token and its end; the count
/// comes from `usage`; a failure status is still an error.
#[tokio::test]
async fn whole_responses_are_timed_and_counted() {
    let addr = start_server().await;
    for (path, req) in [
        ("/v1/completions", request("ok", 5)),
        ("/v1/chat/completions", chat_request("ok", 5)),
    ] {
        let d = HttpDriver::new(
            format!("http://{addr}{path}"),
            None,
            4,
            Duration::from_secs(5),
        )
        .unwrap()
        .streaming(false);
        let r = d.send(&unstreamed(req).body, Instant::now()).await;
        assert!(r.is_ok(), "{path}: {:?}", r.error);
        assert_eq!(r.output_tokens, 5, "{path}");
        let ttft = r.ttft_s.expect("a first token");
        assert!(
            ttft >= 0.28 && ttft <= r.e2e_s,
            "{path}: {ttft} {}",
            r.e2e_s
        );
        assert!(r.itls_s.is_empty());
    }
    let d = HttpDriver::new(
        format!("http://{addr}/v1/completions"),
        None,
        4,
        Duration::from_secs(5),
    )
    .unwrap()
    .streaming(false);
    let r = d
        .send(&unstreamed(request("http500", 5)).body, Instant::now())
        .await;
    assert_eq!(r.error.map(|e| e.kind), Some(ErrorKind::Http(500)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_role_chunk_is_not_the_first_token() {
    let addr = start_server().await;
    let driver = http(addr, "/v1/chat/completions", Duration::from_secs(5));
    let o = run(driver, vec![chat_request("ok", 5); 2], closed(2, 2)).await;
    let s = summary(&o);
    assert_eq!(s.num_completed, 2);
    assert_scripted_timings(&s, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_failures_are_counted_by_kind() {
    let addr = start_server().await;
    let driver = http(addr, "/v1/completions", Duration::from_secs(5));
    let reqs = ["ok", "http500", "inband", "drop", "nodone"]
        .iter()
        .map(|s| request(s, 5))
        .collect();
    let o = run(driver, reqs, closed(5, 5)).await;
    let s = summary(&o);
    assert_eq!((s.num_requests, s.num_completed, s.num_failed), (5, 1, 4));
    for kind in ["http_500", "in_band", "connection", "incomplete"] {
        assert_eq!(s.errors.get(kind), Some(&1), "{kind} in {:?}", s.errors);
    }
    let http500 = o
        .records
        .iter()
        .find_map(|r| r.error.as_ref().filter(|e| e.kind == ErrorKind::Http(500)))
        .unwrap();
    assert_eq!(http500.message, "scripted failure");
    // Latencies are over successes only.
    assert_eq!(s.ttft_ms.unwrap().count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_usage_output_is_counted_by_chunks() {
    let addr = start_server().await;
    let driver = http(addr, "/v1/completions", Duration::from_secs(5));
    let mut req = request("nousage", 6);
    req.input_len = Some(3);
    let o = run(driver, vec![req], closed(1, 1)).await;
    let r = &o.records[0];
    assert!(r.is_ok(), "{:?}", r.error);
    assert_eq!(r.output_tokens, 6);
    assert_eq!(r.output_counted_by, CountSource::Chunks);
    // No usage: the workload's own prompt length stands in.
    assert_eq!(r.input_tokens, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_times_out() {
    let addr = start_server().await;
    let driver = http(addr, "/v1/completions", Duration::from_millis(300));
    let t = Instant::now();
    let o = run(driver, vec![request("slow", 3)], closed(1, 1)).await;
    // "slow" first answers after 2.2 s: the error kind shows the timeout fired, and the
    // bound that it did so before the answer could come.
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let e = o.records[0].error.as_ref().unwrap();
    assert_eq!(e.kind, ErrorKind::Timeout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_connection_error() {
    // Bind and drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let driver = http(port, "/v1/completions", Duration::from_secs(2));
    let o = run(driver, vec![request("ok", 3); 2], closed(1, 2)).await;
    assert_eq!(summary(&o).errors.get("connection"), Some(&2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisson_arrivals_keep_the_rate() {
    let addr = start_server().await;
    let driver = http(addr, "/v1/completions", Duration::from_secs(5));
    let plan = RunPlan {
        shape: LoadShape::Open {
            rate: 100.0,
            burstiness: 1.0,
            max_concurrency: None,
        },
        stop: StopAt::Requests(200),
        warmup_requests: 2,
        seed: 5,
    };
    let o = run(driver, vec![request("fast", 1); 10], plan).await;
    let s = summary(&o);
    assert_eq!(s.num_completed, 200);
    let last_start = o.records.last().unwrap().start_s;
    // Sends may come late on a loaded machine, never early: a rate off by a unit or ignored
    // (all at once) falls far outside these bounds.
    let rate = 199.0 / last_start;
    assert!((50.0..=125.0).contains(&rate), "measured {rate} req/s");
    // Poisson gaps: coefficient of variation near 1 (a fixed-interval sender would give 0).
    let starts: Vec<f64> = o.records.iter().map(|r| r.start_s).collect();
    let gaps: Vec<f64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64).sqrt();
    assert!((0.7..1.3).contains(&(sd / mean)), "cv {}", sd / mean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_cap_limits_in_flight() {
    let addr = start_server().await;
    let driver = http(addr, "/v1/completions", Duration::from_secs(5));
    let plan = RunPlan {
        shape: LoadShape::Open {
            rate: f64::INFINITY,
            burstiness: 1.0,
            max_concurrency: Some(2),
        },
        stop: StopAt::Requests(6),
        warmup_requests: 0,
        seed: 0,
    };
    let o = run(driver, vec![request("ok", 2); 6], plan).await;
    // Six 220 ms requests, two at a time: three waves.
    assert!(o.wall_s > 0.6, "wall {}", o.wall_s);
    assert_eq!(summary(&o).num_completed, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_stops_new_requests() {
    let addr = start_server().await;
    let driver = http(addr, "/v1/completions", Duration::from_secs(5));
    let plan = RunPlan {
        shape: LoadShape::Closed { concurrency: 2 },
        stop: StopAt::Duration(Duration::from_millis(500)),
        warmup_requests: 0,
        seed: 0,
    };
    let o = run(driver, vec![request("ok", 2)], plan).await;
    // Each request takes ~220 ms: each worker starts 3 (at 0, 220, 440 ms), none after 500.
    assert_eq!(o.records.len(), 6);
    assert!(o.records.iter().all(|r| r.start_s < 0.5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_timings_match_the_script() {
    let addr = start_server().await;
    let driver = ws(addr, 2, Endpoint::Completions).await;
    let o = run(driver, vec![request("ok", 10); 8], closed(8, 8)).await;
    let s = summary(&o);
    assert_eq!((s.num_completed, s.num_failed), (8, 0));
    assert_eq!(s.total_output_tokens, 80);
    assert_scripted_timings(&s, 10);
    // All eight multiplexed on two sockets at once: one wave.
    assert_eq!(max_in_flight(&o), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_chat_and_in_band_errors() {
    let addr = start_server().await;
    let driver = ws(addr, 1, Endpoint::Chat).await;
    let reqs = vec![chat_request("ok", 4), chat_request("inband", 4)];
    let o = run(driver, reqs, closed(2, 2)).await;
    let s = summary(&o);
    assert_eq!((s.num_completed, s.num_failed), (1, 1));
    assert_eq!(s.errors.get("in_band"), Some(&1));
    assert_scripted_timings(&s, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_closed_socket_fails_its_requests() {
    let addr = start_server().await;
    let driver = ws(addr, 1, Endpoint::Completions).await;
    // The drop closes the one socket: the request in flight beside it fails too, and a request
    // sent afterwards finds the socket gone.
    let reqs = vec![request("drop", 4), request("ok", 10)];
    let o = run(driver.clone(), reqs, closed(2, 2)).await;
    let s = summary(&o);
    assert_eq!(s.errors.get("connection"), Some(&2), "{:?}", s.errors);
    let after = run(driver, vec![request("ok", 2)], closed(1, 1)).await;
    assert_eq!(summary(&after).errors.get("connection"), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_server_paces_both_transports() {
    let args = sluice::bench::mock::MockArgs {
        addr: "127.0.0.1:0".parse().unwrap(),
        ttft_ms: 50,
        itl_ms: 10,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = sluice::bench::mock::router(args);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    for driver in [
        http(addr, "/v1/chat/completions", Duration::from_secs(5)),
        ws(addr, 1, Endpoint::Chat).await,
    ] {
        let o = run(driver, vec![chat_request("hi", 5); 4], closed(4, 4)).await;
        let s = summary(&o);
        assert_eq!((s.num_completed, s.total_output_tokens), (4, 20));
        let (ttft, tpot) = (s.ttft_ms.unwrap(), s.tpot_ms.unwrap());
        // Lower bounds: the mock's pacing; upper: room for a loaded machine.
        assert!(ttft.min >= 48.0 && ttft.max < 250.0, "{ttft:?}");
        assert!(tpot.mean >= 9.0 && tpot.mean < 60.0, "{tpot:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_stops_new_requests_and_keeps_finished_ones() {
    let addr = start_server().await;
    let driver = http(addr, "/v1/completions", Duration::from_secs(5));
    for shape in [
        LoadShape::Closed { concurrency: 2 },
        LoadShape::Open {
            rate: 5.0,
            burstiness: 1.0,
            max_concurrency: None,
        },
    ] {
        let plan = RunPlan {
            shape,
            stop: StopAt::Duration(Duration::from_secs(10)),
            warmup_requests: 0,
            seed: 0,
        };
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.send(true).unwrap();
        });
        let t = Instant::now();
        let reqs = Arc::new(vec![request("ok", 2)]);
        let o = sluice::bench::runner::run_load_until(
            driver.clone(),
            reqs,
            &plan,
            ProgressBar::hidden(),
            rx,
        )
        .await;
        assert!(o.interrupted);
        // The run was for 10 s: ending well before is the interrupt's doing.
        assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
        assert!(!o.records.is_empty());
        assert!(o.records.iter().all(|r| r.is_ok()));
    }
}
