//! The Files, Batch and async APIs (issue 20) against the real `sluice serve` with
//! `--data-dir`: answers equal the same greedy request run online, every `custom_id` is
//! answered exactly once, bad lines fail alone, SIGKILL mid-batch resumes without rerunning
//! finished lines, cancel keeps what finished, a finished batch is still listed after a
//! restart, an unwritable `--data-dir` fails at start-up, a webhook still being retried when
//! the server is SIGKILLed is delivered after the restart; and the `openai` SDK end to end.

use crate::api_support;
use crate::batch_support;

use std::process::Command;
use std::time::{Duration, Instant};

use api_support::{metric, metrics, post_json};
use batch_support::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_lines_match_online_and_bad_lines_fail_alone() {
    let dir = data_dir("e2e");
    let hook = std::net::TcpListener::bind("127.0.0.1:0").expect("a webhook listener");
    let hook_addr = hook.local_addr().expect("an address").to_string();
    let hook_thread = std::thread::spawn(move || webhook_receiver(hook));
    let cancel_hook = std::net::TcpListener::bind("127.0.0.1:0").expect("a webhook listener");
    let cancel_hook_addr = cancel_hook.local_addr().expect("an address").to_string();
    let cancel_deliveries = webhook_server(cancel_hook, 0);
    let allowed = format!("{hook_addr},{cancel_hook_addr}");
    let server = start(
        &dir,
        &[
            "--max-file-bytes",
            "4096",
            "--webhook-allowed-hosts",
            &allowed,
        ],
    );
    let url = server.url.clone();
    let topics = ["cats", "rivers", "the moon", "bread"];
    let mut lines: Vec<String> = topics.iter().map(|t| line(t, &chat_body(t, 8))).collect();
    lines.push("{not json".into());
    lines.push(r#"{"custom_id":"emb","method":"POST","url":"/v1/embeddings","body":{}}"#.into());
    let mut bogus = chat_body("x", 4);
    bogus["bogus_field"] = json!(1);
    lines.push(line("unknown-field", &bogus));
    lines.push(line("cats", &chat_body("dup", 4)));
    let id = create_batch(&url, &lines).await;
    let b = wait_batch(&url, &id, is_final).await;
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(
        b["request_counts"],
        json!({"total": 8, "completed": 4, "failed": 4})
    );
    assert_eq!(b["metadata"], json!({"test": "yes"}));
    for key in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(b[key].as_i64().is_some(), "{key} unset: {b}");
    }
    let (out, err) = records(&url, &b).await;
    for t in topics {
        assert_eq!(
            content(&out[t]),
            online(&url, &chat_body(t, 8)).await,
            "{t}"
        );
        assert_eq!(out[t]["response"]["status_code"], 200);
    }
    assert_eq!(err["line 5"]["error"]["code"], "invalid_json_line");
    assert_eq!(err["emb"]["error"]["code"], "mismatched_url");
    assert_eq!(err["emb"]["error"]["line"], 6);
    let refused = &err["unknown-field"]["response"];
    assert_eq!(refused["status_code"], 400);
    assert_eq!(refused["body"]["error"]["param"], "bogus_field");
    // The duplicate's line is 8; the first `cats` stays in the output.
    assert_eq!(err.len(), 4, "{err:?}");
    assert!(err
        .values()
        .any(|r| r["error"]["code"] == "duplicate_custom_id" && r["error"]["line"] == 8));

    // Offline, the same file: one record per line, in input order, the same answers.
    let input = dir.join("offline-in.jsonl");
    let output = dir.join("offline-out.jsonl");
    std::fs::write(&input, lines.join("\n")).expect("writing the input");
    let run = Command::new(api_support::sluice_bin())
        .args(["batch", "run", "--threads", "2", "--max-model-len", "1024"])
        .args(["--kv-cache-memory", "134217728", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running sluice batch run");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("8 lines, 4 succeeded, 4 failed"),
        "{stderr}"
    );
    let offline: Vec<Value> = std::fs::read_to_string(&output)
        .expect("the output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a record"))
        .collect();
    assert_eq!(offline.len(), 8);
    for (t, r) in topics.iter().zip(&offline) {
        assert_eq!(
            (r["custom_id"].as_str(), content(r)),
            (Some(*t), content(&out[*t]))
        );
    }
    assert_eq!(offline[4]["error"]["line"], 5);
    assert_eq!(offline[7]["error"]["code"], "duplicate_custom_id");

    // Over --max-file-bytes: 413, nothing stored.
    let (status, e) = upload(&url, &vec![b'x'; 5000]).await;
    assert_eq!(status, 413, "{e}");
    // Pagination: newest first, `after` the last id of a page.
    let second = create_batch(&url, &[line("one", &chat_body("one", 2))]).await;
    let page = get(&format!("{url}/v1/batches?limit=1")).await;
    assert_eq!(
        (page["data"][0]["id"].as_str(), page["has_more"].as_bool()),
        (Some(second.as_str()), Some(true))
    );
    let page = get(&format!("{url}/v1/batches?limit=1&after={second}")).await;
    assert_eq!(page["data"][0]["id"], id.as_str());
    assert_eq!(page["has_more"], false);
    wait_batch(&url, &second, is_final).await;

    // Async: 202, then the same answer as online; a webhook host not allowed is a 400.
    let mut hooked = chat_body("cats", 8);
    hooked["webhook_url"] = json!(format!("http://{hook_addr}/done"));
    let resp = api_support::post(&format!("{url}/v1/async/chat/completions"), &hooked)
        .send()
        .await
        .expect("POST async");
    assert_eq!(resp.status().as_u16(), 202);
    let job: Value = resp.json().await.expect("a job");
    let job_id = job["id"].as_str().expect("a job id");
    let start = Instant::now();
    let done = loop {
        let j = get(&format!("{url}/v1/async/jobs/{job_id}")).await;
        if j["status"] == "completed" || j["status"] == "failed" {
            break j;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["result"]["choices"][0]["message"]["content"].as_str(),
        Some(online(&url, &chat_body("cats", 8)).await.as_str())
    );
    // The webhook got the finished job, the second time (the first answer was a 500).
    let hooks = hook_thread.join().expect("the webhook receiver");
    assert_eq!(hooks.len(), 2);
    for h in &hooks {
        assert_eq!(
            (&h["id"], &h["status"]),
            (&done["id"], &json!("completed")),
            "{h}"
        );
    }
    // A cancelled job announces its end on its webhook too.
    let mut long = chat_body("the sea", 900);
    long["webhook_url"] = json!(format!("http://{cancel_hook_addr}/done"));
    let job = post_json(&format!("{url}/v1/async/chat/completions"), &long).await;
    let job_id = job["id"].as_str().expect("a job id");
    let cancelled = post_json(&format!("{url}/v1/async/jobs/{job_id}/cancel"), &json!({})).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let (hook, status) = cancel_deliveries
        .recv_timeout(Duration::from_secs(30))
        .expect("the cancelled job's webhook");
    assert_eq!(
        (&hook["id"], &hook["status"], status),
        (&json!(job_id), &json!("cancelled"), 200)
    );
    let mut hooked = chat_body("x", 2);
    hooked["webhook_url"] = json!("http://evil.example/x");
    let e = post_json(&format!("{url}/v1/async/chat/completions"), &hooked).await;
    assert_eq!(e["error"]["param"], "webhook_url", "{e}");
    let mut streamed = chat_body("x", 2);
    streamed["stream"] = json!(true);
    let e = post_json(&format!("{url}/v1/async/chat/completions"), &streamed).await;
    assert_eq!(e["error"]["param"], "stream", "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_resumes_and_finished_batches_stay_listed() {
    let dir = data_dir("kill");
    let flags = ["--max-batch-concurrency", "1"];
    let mut server = start(&dir, &flags);
    let lines = slow_lines(8);
    let text: Vec<String> = lines.iter().map(|(id, b)| line(id, b)).collect();
    let id = create_batch(&server.url, &text).await;
    wait_batch(&server.url, &id, |b| {
        b["request_counts"]["completed"].as_u64() >= Some(2)
    })
    .await;
    let status = Command::new("kill")
        .args(["-KILL", &server.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    server.wait_exit(Duration::from_secs(10));
    // What the database holds as finished is what must not rerun.
    let finished: i64 = rusqlite::Connection::open(dir.join("jobs.db"))
        .expect("the job database")
        .query_row(
            "SELECT COUNT(*) FROM batch_lines WHERE status = 'done'",
            [],
            |r| r.get(0),
        )
        .expect("a count");
    assert!(
        (2..8).contains(&finished),
        "{finished} lines finished before the kill"
    );

    let server = start(&dir, &flags);
    let b = wait_batch(&server.url, &id, is_final).await;
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(
        b["request_counts"],
        json!({"total": 8, "completed": 8, "failed": 0})
    );
    // Less the model's warm-up request (docs/models.md).
    let reruns = metric(&metrics(&server).await, "sluice:request_success_total") - 1.0;
    assert_eq!(
        reruns as i64,
        8 - finished,
        "finished lines ran again after the restart"
    );
    let (out, err) = records(&server.url, &b).await;
    assert!(err.is_empty(), "{err:?}");
    assert_eq!(out.len(), 8);
    for (cid, body) in &lines {
        assert_eq!(
            content(&out[cid.as_str()]),
            online(&server.url, body).await,
            "{cid}"
        );
    }
    drop(server);

    // Restarted again: the finished batch is listed, its output still readable.
    let server = start(&dir, &flags);
    let list = get(&format!("{}/v1/batches", server.url)).await;
    assert_eq!(list["data"][0]["id"], id.as_str(), "{list}");
    assert_eq!(list["data"][0]["status"], "completed");
    let (again, _) = records(&server.url, &list["data"][0]).await;
    assert_eq!(again.len(), 8);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_being_retried_is_delivered_after_sigkill() {
    let dir = data_dir("hook-kill");
    let hook = std::net::TcpListener::bind("127.0.0.1:0").expect("a webhook listener");
    let hook_addr = hook.local_addr().expect("an address").to_string();
    // Refuses the first two attempts: the kill lands while the job's webhook is being retried.
    let attempts = webhook_server(hook, 2);
    let flags = ["--webhook-allowed-hosts", hook_addr.as_str()];
    let mut server = start(&dir, &flags);
    let mut body = chat_body("owls", 4);
    body["webhook_url"] = json!(format!("http://{hook_addr}/done"));
    let job = post_json(&format!("{}/v1/async/chat/completions", server.url), &body).await;
    let job_id = job["id"].as_str().expect("a job id").to_string();
    let recv = |what: &str| {
        attempts
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{what}: no webhook delivery: {e}"))
    };
    let (first, status) = recv("before the kill");
    assert_eq!((first["id"].as_str(), status), (Some(job_id.as_str()), 500));
    let status = Command::new("kill")
        .args(["-KILL", &server.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    server.wait_exit(Duration::from_secs(10));
    let db = || rusqlite::Connection::open(dir.join("jobs.db")).expect("the job database");
    let state: String = db()
        .query_row(
            "SELECT state FROM webhooks WHERE job_id = ?1",
            [&job_id],
            |r| r.get(0),
        )
        .expect("a delivery row");
    assert_eq!(state, "pending");

    // After the restart the retries go on (at least once: the attempt the kill cut short may
    // come again) until one is answered 200.
    let server = start(&dir, &flags);
    let delivered = loop {
        let (hook, status) = recv("after the restart");
        assert_eq!(hook["id"].as_str(), Some(job_id.as_str()), "{hook}");
        if status == 200 {
            break hook;
        }
    };
    assert_eq!(delivered["status"], "completed", "{delivered}");
    assert_eq!(
        delivered["result"]["choices"][0]["message"]["content"].as_str(),
        Some(online(&server.url, &chat_body("owls", 4)).await.as_str())
    );
    let start_wait = Instant::now();
    loop {
        let state: String = db()
            .query_row(
                "SELECT state FROM webhooks WHERE job_id = ?1",
                [&job_id],
                |r| r.get(0),
            )
            .expect("a delivery row");
        if state == "delivered" {
            break;
        }
        assert!(start_wait.elapsed() < Duration::from_secs(10), "{state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_run_keeps_finished_lines() {
    let dir = data_dir("cancel");
    let server = start(&dir, &["--max-batch-concurrency", "1"]);
    let url = server.url.clone();
    let lines = slow_lines(10);
    let text: Vec<String> = lines.iter().map(|(id, b)| line(id, b)).collect();
    let id = create_batch(&url, &text).await;
    wait_batch(&url, &id, |b| {
        b["request_counts"]["completed"].as_u64() >= Some(2)
    })
    .await;
    let c = post_json(&format!("{url}/v1/batches/{id}/cancel"), &json!({})).await;
    assert!(
        matches!(c["status"].as_str(), Some("cancelling" | "cancelled")),
        "{c}"
    );
    let b = wait_batch(&url, &id, is_final).await;
    assert_eq!(b["status"], "cancelled", "{b}");
    assert!(b["cancelled_at"].as_i64().is_some());
    let (out, err) = records(&url, &b).await;
    let done = b["request_counts"]["completed"].as_u64().expect("a count") as usize;
    assert!((2..10).contains(&done), "{b}");
    assert_eq!((out.len(), err.len()), (done, 10 - done));
    for (cid, body) in &lines {
        match out.get(cid.as_str()) {
            Some(r) => assert_eq!(content(r), online(&url, body).await, "{cid}"),
            None => assert_eq!(err[cid.as_str()]["error"]["code"], "batch_cancelled"),
        }
    }
    api_support::assert_idle_without_leaks(&server).await;

    // A window that passes mid-run: `expired`, the lines left are `batch_expired`.
    let (status, file) = upload(&url, text.join("\n").as_bytes()).await;
    assert_eq!(status, 200);
    let b = post_json(
        &format!("{url}/v1/batches"),
        &json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                "completion_window": "2s"}),
    )
    .await;
    let b = wait_batch(&url, b["id"].as_str().expect("an id"), is_final).await;
    assert_eq!(b["status"], "expired", "{b}");
    let (out, err) = records(&url, &b).await;
    assert_eq!(out.len() + err.len(), 10);
    assert!(!err.is_empty() && err.values().all(|r| r["error"]["code"] == "batch_expired"));
    api_support::assert_idle_without_leaks(&server).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unwritable_data_dir_fails_at_start_up() {
    let file = std::env::temp_dir().join(format!("sluice-not-a-dir-{}", std::process::id()));
    std::fs::write(&file, b"x").expect("a file");
    let start = Instant::now();
    let out = Command::new(api_support::sluice_bin())
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(file.join("data"))
        .output()
        .expect("running sluice serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--data-dir"), "{stderr}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "it loaded the model first"
    );
    let _ = std::fs::remove_file(file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_files_and_batches() {
    let dir = data_dir("sdk");
    let server = start(&dir, &[]);
    let url = server.url.clone();
    let out =
        tokio::task::spawn_blocking(move || api_support::run_python("batch_checks.py", &url, &[]))
            .await
            .expect("python task");
    assert!(out.contains("batch checks passed"), "{out}");
    let _ = std::fs::remove_dir_all(dir);
}
