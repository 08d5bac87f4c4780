//! `sluice bench compare`: result files side by side, each figure with its ratio to the
//! first file's. A ratio above 1 means more of the figure: better for throughputs, worse for
//! latencies.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use super::report::{BenchResult, Stats, Summary};
use super::BenchError;

pub fn load_result(path: &Path) -> Result<BenchResult, BenchError> {
    let file_error = |message: String| BenchError::File {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| file_error(format!("not a bench result: {e}")))
}

pub fn compare_files(paths: &[PathBuf]) -> Result<String, BenchError> {
    let results = paths
        .iter()
        .map(|p| load_result(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(compare(&results))
}

type Figure = fn(&Summary) -> Option<f64>;

fn stat(s: &Option<Stats>, f: fn(&Stats) -> f64) -> Option<f64> {
    s.as_ref().map(f)
}

/// The figures compared, in order: (name, getter, decimals).
const FIGURES: &[(&str, Figure, usize)] = &[
    ("completed", |s| Some(s.num_completed as f64), 0),
    ("failed", |s| Some(s.num_failed as f64), 0),
    ("duration (s)", |s| Some(s.duration_s), 2),
    (
        "request throughput (req/s)",
        |s| Some(s.request_throughput),
        2,
    ),
    (
        "output throughput (tok/s)",
        |s| Some(s.output_throughput),
        1,
    ),
    (
        "total throughput (tok/s)",
        |s| Some(s.total_token_throughput),
        1,
    ),
    (
        "goodput (req/s)",
        |s| s.goodput.as_ref().map(|g| g.request_goodput),
        2,
    ),
    ("TTFT mean (ms)", |s| stat(&s.ttft_ms, |x| x.mean), 2),
    ("TTFT median (ms)", |s| stat(&s.ttft_ms, |x| x.median), 2),
    ("TTFT p99 (ms)", |s| stat(&s.ttft_ms, |x| x.p99), 2),
    ("TPOT mean (ms)", |s| stat(&s.tpot_ms, |x| x.mean), 2),
    ("TPOT median (ms)", |s| stat(&s.tpot_ms, |x| x.median), 2),
    ("TPOT p99 (ms)", |s| stat(&s.tpot_ms, |x| x.p99), 2),
    ("ITL median (ms)", |s| stat(&s.itl_ms, |x| x.median), 2),
    ("ITL p99 (ms)", |s| stat(&s.itl_ms, |x| x.p99), 2),
    ("E2E median (ms)", |s| stat(&s.e2e_ms, |x| x.median), 1),
    ("E2E p99 (ms)", |s| stat(&s.e2e_ms, |x| x.p99), 1),
    (
        "client CPU (% of a core)",
        |s| s.client_cpu.as_ref().map(|c| c.percent_of_one_core),
        1,
    ),
];

/// The side-by-side table of `results` (at least one).
pub fn compare(results: &[BenchResult]) -> String {
    const NAME_W: usize = 28;
    const COL_W: usize = 24;
    let mut t = String::new();
    let header = |t: &mut String, name: &str, cells: Vec<String>| {
        let _ = write!(t, "{name:<NAME_W$}");
        for c in cells {
            let _ = write!(t, "{:>COL_W$}", truncate(&c, COL_W - 2));
        }
        t.push('\n');
    };
    header(
        &mut t,
        "",
        results.iter().map(|r| r.label.clone()).collect(),
    );
    header(
        &mut t,
        "workload",
        results
            .iter()
            .map(|r| {
                let c = &r.config;
                let load = match (c.request_rate, c.concurrency) {
                    (Some(rate), _) => format!("rate {rate}"),
                    (None, n) => format!("conc {}", n.unwrap_or(1)),
                };
                format!("{:?} {load}", c.workload).to_lowercase()
            })
            .collect(),
    );
    header(
        &mut t,
        "commit",
        results
            .iter()
            .map(|r| r.git_commit.clone().unwrap_or_else(|| "-".into()))
            .collect(),
    );
    let Some(base) = results.first() else {
        return t;
    };
    for (name, get, decimals) in FIGURES {
        let base_value = get(&base.summary);
        let cells = results
            .iter()
            .enumerate()
            .map(|(i, r)| match get(&r.summary) {
                None => "-".to_string(),
                Some(v) => {
                    let ratio = match base_value {
                        Some(b) if i > 0 && b != 0.0 => format!(" (x{:.2})", v / b),
                        _ => String::new(),
                    };
                    format!("{v:.decimals$}{ratio}")
                }
            })
            .collect();
        header(&mut t, name, cells);
    }
    t
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        s.chars().take(max - 1).chain(['~']).collect()
    }
}
