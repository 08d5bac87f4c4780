//! Statistics over a run's records, the stdout table, and the result file.
//!
//! Latency figures are over successful requests only; failed ones are counted by kind in
//! `errors`. Throughputs divide by the run's wall time (first send to last answer). ITLs are
//! pooled over all requests; TTFT, TPOT and E2E are one value per request. Percentiles
//! interpolate linearly between order statistics (numpy's default).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::client::{CountSource, RequestRecord};
use super::sysinfo::{CpuTimes, MachineInfo};
use super::ServeArgs;

/// Summary statistics of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub count: usize,
    pub mean: f64,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    /// Statistics of `values` (any unit); `None` when empty.
    pub fn of(values: &[f64]) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Stats {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            median: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

/// The `p`th percentile of sorted, non-empty `v`, interpolated linearly.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let rank = p / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

/// Service-level objectives for goodput, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goodput {
    pub slo: Slo,
    /// successful requests within every given objective
    pub num_good: usize,
    /// good requests per second
    pub request_goodput: f64,
}

/// The client's own CPU use over the run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClientCpu {
    pub user_s: f64,
    pub sys_s: f64,
    /// (user + sys) / wall time × 100: 100 means one core fully busy
    pub percent_of_one_core: f64,
}

/// Every figure of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub num_requests: usize,
    pub num_completed: usize,
    pub num_failed: usize,
    /// failed requests by `ErrorKind::label`
    pub errors: BTreeMap<String, usize>,
    /// in seconds
    pub duration_s: f64,
    /// completed requests per second
    pub request_throughput: f64,
    /// output tokens of completed requests per second
    pub output_throughput: f64,
    /// input plus output tokens of completed requests per second
    pub total_token_throughput: f64,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    /// completed requests whose output was counted from `usage` (the rest: by chunks)
    pub num_counted_by_usage: usize,
    pub ttft_ms: Option<Stats>,
    pub tpot_ms: Option<Stats>,
    pub itl_ms: Option<Stats>,
    pub e2e_ms: Option<Stats>,
    pub goodput: Option<Goodput>,
    pub client_cpu: Option<ClientCpu>,
}

const MS: f64 = 1000.0;

pub fn summarize(
    records: &[RequestRecord],
    wall_s: f64,
    cpu: Option<CpuTimes>,
    slo: Slo,
) -> Summary {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.is_ok()).collect();
    let mut errors = BTreeMap::new();
    for r in records {
        if let Some(e) = &r.error {
            *errors.entry(e.kind.label()).or_insert(0) += 1;
        }
    }
    let total_input_tokens: u64 = ok.iter().filter_map(|r| r.input_tokens).sum();
    let total_output_tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
    let per_s = |x: f64| if wall_s > 0.0 { x / wall_s } else { 0.0 };
    let ms = |f: &dyn Fn(&RequestRecord) -> Option<f64>| -> Vec<f64> {
        ok.iter().filter_map(|r| f(r)).map(|s| s * MS).collect()
    };
    let ttfts = ms(&|r| r.ttft_s);
    let tpots = ms(&|r| r.tpot_s());
    let itls: Vec<f64> = ok
        .iter()
        .flat_map(|r| r.itls_s.iter().map(|s| s * MS))
        .collect();
    let goodput = (slo.ttft_ms.is_some() || slo.tpot_ms.is_some()).then(|| {
        let within = |limit: Option<f64>, value: Option<f64>| match (limit, value) {
            (None, _) => true,
            (Some(l), Some(v)) => v * MS <= l,
            // A request with one token has no TPOT: it cannot miss a TPOT objective.
            (Some(_), None) => true,
        };
        let num_good = ok
            .iter()
            .filter(|r| within(slo.ttft_ms, r.ttft_s) && within(slo.tpot_ms, r.tpot_s()))
            .count();
        Goodput {
            slo,
            num_good,
            request_goodput: per_s(num_good as f64),
        }
    });
    Summary {
        num_requests: records.len(),
        num_completed: ok.len(),
        num_failed: records.len() - ok.len(),
        errors,
        duration_s: wall_s,
        request_throughput: per_s(ok.len() as f64),
        output_throughput: per_s(total_output_tokens as f64),
        total_token_throughput: per_s((total_input_tokens + total_output_tokens) as f64),
        total_input_tokens,
        total_output_tokens,
        num_counted_by_usage: ok
            .iter()
            .filter(|r| r.output_counted_by == CountSource::Usage)
            .count(),
        ttft_ms: Stats::of(&ttfts),
        tpot_ms: Stats::of(&tpots),
        itl_ms: Stats::of(&itls),
        e2e_ms: Stats::of(&ms(&|r| Some(r.e2e_s))),
        goodput,
        client_cpu: cpu.map(|c| ClientCpu {
            user_s: c.user_s,
            sys_s: c.sys_s,
            percent_of_one_core: per_s(c.total_s()) * 100.0,
        }),
    }
}

/// The result file: every figure, the full configuration, and every request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    pub label: String,
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`
    pub date: String,
    /// of the directory the bench ran in, if a git checkout
    pub git_commit: Option<String>,
    pub sluice_version: String,
    pub machine: MachineInfo,
    pub config: ServeArgs,
    pub summary: Summary,
    /// stopped early by Ctrl-C: the figures cover what ran
    #[serde(default)]
    pub interrupted: bool,
    /// a few failures' messages, to see what went wrong without reading every request
    #[serde(default)]
    pub error_samples: Vec<String>,
    #[serde(default)]
    pub requests: Vec<RequestRecord>,
    /// the wall-clock time of the start of measurement (requests' `start_s` count from it), in
    /// Unix milliseconds: to place requests beside events outside the bench (a replica killed)
    #[serde(default)]
    pub origin_unix_ms: Option<u64>,
}

/// How many distinct error messages to keep in `error_samples`.
const MAX_ERROR_SAMPLES: usize = 5;

pub fn error_samples(records: &[RequestRecord]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in records.iter().filter_map(|r| r.error.as_ref()) {
        let s = format!("{}: {}", e.kind.label(), e.message);
        if !out.contains(&s) {
            out.push(s);
            if out.len() == MAX_ERROR_SAMPLES {
                break;
            }
        }
    }
    out
}

/// The human-readable report.
pub fn render(result: &BenchResult) -> String {
    let s = &result.summary;
    let mut t = String::new();
    let w = &mut t;
    let note = if result.interrupted {
        " (interrupted)"
    } else {
        ""
    };
    let _ = writeln!(w, "==== sluice bench serve: {}{note} ====", result.label);
    let row = |w: &mut String, k: &str, v: String| {
        let _ = writeln!(w, "{k:<34}{v:>14}");
    };
    row(w, "Successful requests:", s.num_completed.to_string());
    row(w, "Failed requests:", s.num_failed.to_string());
    for (kind, n) in &s.errors {
        row(w, &format!("  {kind}:"), n.to_string());
    }
    row(w, "Duration (s):", format!("{:.2}", s.duration_s));
    row(w, "Total input tokens:", s.total_input_tokens.to_string());
    row(w, "Total output tokens:", s.total_output_tokens.to_string());
    if s.num_counted_by_usage < s.num_completed {
        row(
            w,
            "  (counted by chunks, no usage):",
            (s.num_completed - s.num_counted_by_usage).to_string(),
        );
    }
    row(
        w,
        "Request throughput (req/s):",
        format!("{:.2}", s.request_throughput),
    );
    row(
        w,
        "Output token throughput (tok/s):",
        format!("{:.2}", s.output_throughput),
    );
    row(
        w,
        "Total token throughput (tok/s):",
        format!("{:.2}", s.total_token_throughput),
    );
    if let Some(g) = &s.goodput {
        row(
            w,
            "Request goodput (req/s):",
            format!("{:.2}", g.request_goodput),
        );
        row(
            w,
            "  good / completed:",
            format!("{}/{}", g.num_good, s.num_completed),
        );
    }
    if let Some(c) = &s.client_cpu {
        row(
            w,
            "Client CPU (% of one core):",
            format!("{:.1}", c.percent_of_one_core),
        );
    }
    let _ = writeln!(
        w,
        "{:<12}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "(ms)", "mean", "median", "p90", "p99", "max"
    );
    for (name, st) in [
        ("TTFT", &s.ttft_ms),
        ("TPOT", &s.tpot_ms),
        ("ITL", &s.itl_ms),
        ("E2E", &s.e2e_ms),
    ] {
        match st {
            Some(st) => {
                let _ = writeln!(
                    w,
                    "{name:<12}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
                    st.mean, st.median, st.p90, st.p99, st.max
                );
            }
            None => {
                let _ = writeln!(w, "{name:<12}{:>10}", "-");
            }
        }
    }
    for e in &result.error_samples {
        let _ = writeln!(w, "error: {e:.300}");
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::client::{ErrorKind, RequestError};

    fn rec(ttft: f64, e2e: f64, out: u64) -> RequestRecord {
        RequestRecord {
            start_s: 0.0,
            ttft_s: Some(ttft),
            e2e_s: e2e,
            itls_s: vec![(e2e - ttft) / (out - 1) as f64; out as usize - 1],
            input_tokens: Some(10),
            output_tokens: out,
            output_counted_by: CountSource::Usage,
            error: None,
        }
    }

    #[test]
    fn percentiles_interpolate() {
        let v: Vec<f64> = (1..=11).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 6.0);
        assert_eq!(percentile(&v, 90.0), 10.0);
        assert!((percentile(&v, 99.0) - 10.9).abs() < 1e-9);
        let st = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((st.mean, st.median, st.min, st.max), (2.0, 2.0, 1.0, 3.0));
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn summary_counts_errors_and_goodput() {
        let mut failed = rec(0.1, 0.5, 5);
        failed.error = Some(RequestError::new(ErrorKind::Http(503), "busy"));
        let records = vec![rec(0.1, 1.1, 11), rec(0.3, 1.3, 11), failed];
        let slo = Slo {
            ttft_ms: Some(200.0),
            tpot_ms: Some(150.0),
        };
        let s = summarize(&records, 2.0, None, slo);
        assert_eq!((s.num_completed, s.num_failed), (2, 1));
        assert_eq!(s.errors.get("http_503"), Some(&1));
        assert_eq!(s.total_output_tokens, 22);
        assert_eq!(s.total_input_tokens, 20);
        assert!((s.output_throughput - 11.0).abs() < 1e-9);
        assert!((s.tpot_ms.unwrap().mean - 100.0).abs() < 1e-9);
        assert!((s.ttft_ms.unwrap().median - 200.0).abs() < 1e-9);
        assert_eq!(s.itl_ms.unwrap().count, 20);
        let g = s.goodput.unwrap();
        assert_eq!(g.num_good, 1);
        assert!((g.request_goodput - 0.5).abs() < 1e-9);
    }
}
