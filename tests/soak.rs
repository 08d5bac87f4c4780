//! `sluice bench soak` for a few seconds against a real server started with
//! `--enable-fault-injection`: it must pass its own verdict (no unexpected 5xx, no leaked
//! block, `/metrics` read once idle, RSS growth after warm-up within the documented 64 MiB).
//! `scripts/soak.sh` runs it for as long as one likes.

use crate::api_support;

use std::process::Command;

use api_support::{sluice_bin, Server};

#[test]
fn a_short_soak_passes() {
    let server = Server::start(&[
        "--max-num-seqs",
        "4",
        "--max-waiting",
        "8",
        "--enable-fault-injection",
    ]);
    let out = Command::new(sluice_bin())
        .args([
            "bench",
            "soak",
            "--duration",
            "12s",
            "--concurrency",
            "6",
            "--faults",
        ])
        .args(["--url", &server.url, "--pid", &server.pid().to_string()])
        .args(["--max-rss-growth", "64"])
        .output()
        .expect("running sluice bench soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "soak failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON report");
    assert!(report["ok"].as_u64().unwrap() > 0, "{report}");
    assert!(report["client_errors"].as_u64().unwrap() > 0, "{report}");
    assert!(report["injected_faults"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["kv_accounting_errors"], 0.0, "{report}");
    assert_eq!(report["kv_usage_after"], 0.0, "{report}");
    assert!(
        report["rss_growth_after_warmup_mib"].is_number(),
        "{report}"
    );
    // The margin to the limit, for the log.
    println!(
        "RSS growth after warm-up: {} MiB (limit 64)",
        report["rss_growth_after_warmup_mib"]
    );
}
