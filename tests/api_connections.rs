//! `--max-connections`: connections past the limit get a 503 with `Retry-After` and the
//! OpenAI error object, then close; once a connection ends, its slot serves again.

mod api_support;

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
