//! The edge. `--max-connections`: connections past the limit get a 503 with `Retry-After` and
//! the OpenAI error object, then close; once a connection ends, its slot serves again.
//! `--api-keys-file`: several keys, each with its own requests and tokens per minute, refused
//! with OpenAI's 429, its `x-ratelimit-*` headers and a retry time the SDK honours.

use crate::api_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use api_support::Server;

fn get_health(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn connections_past_the_limit_are_told_to_retry() {
    let server = Server::start(&["--max-connections", "2"]);
    let addr = server.url.trim_start_matches("http://").to_string();
    // Two connections hold both slots (a partial head keeps them open).
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let refused = get_health(&addr);
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    assert!(refused.contains("\"too many connections"), "{refused}");
    drop(held);
    // The slots come back once those connections are gone.
    let start = Instant::now();
    loop {
        let answer = get_health(&addr);
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{answer}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn per_key_rate_limits_through_the_openai_sdk() {
    let keys = std::env::temp_dir().join(format!("sluice-keys-{}.toml", std::process::id()));
    std::fs::write(
        &keys,
        r#"
[[key]]
name = "two-a-minute"
key = "key-rpm2"
requests_per_minute = 2

[[key]]
name = "thirty-tokens"
key = "key-tpm30"
tokens_per_minute = 30

[[key]]
name = "one-a-second"
key = "key-rpm60"
requests_per_minute = 60

[[key]]
name = "free"
key = "key-free"
"#,
    )
    .unwrap();
    let server = Server::start(&["--api-keys-file", keys.to_str().unwrap()]);
    api_support::run_python("rate_limit_checks.py", &server.url, &[]);
    let _ = std::fs::remove_file(keys);
}
