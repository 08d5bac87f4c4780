//! The fuzz targets' bodies on stable Rust: every file of `fuzz/corpus/<target>/` (seeds and
//! any crash a fuzzer found, kept as a regression), then a bounded number of seeded random
//! mutations of them, so `cargo test` fuzzes a little on every run. `cargo +nightly fuzz run`
//! fuzzes the same bodies for as long as one likes.

#[path = "../fuzz/bodies.rs"]
mod bodies;

use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Mutations per target per run (each a fresh input to the body).
const MUTATIONS: usize = 400;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// One random edit of `input`, sometimes spliced with another seed: the usual byte-level
/// mutations (flip, set to an interesting value, insert, delete, duplicate a range).
fn mutate(rng: &mut ChaCha8Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = v.len();
        match rng.random_range(0..6) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = [0, 0xff, 0x7f, 0x80, b'"', b'{', b'\\', 0][rng.random_range(0..8)];
            }
            2 => {
                let i = rng.random_range(0..=len);
                let b: u8 = rng.random();
                v.insert(i, b);
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(16));
                v.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(32));
                let chunk = v[i..i + n].to_vec();
                v.splice(i..i, chunk);
            }
            _ if !other.is_empty() => {
                let cut = rng.random_range(0..=v.len());
                let from = rng.random_range(0..other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ => {}
        }
    }
    v
}

fn run(target: &str, body: fn(&[u8])) {
    let seeds = corpus(target);
    for s in &seeds {
        body(s);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    for _ in 0..MUTATIONS {
        let a = &seeds[rng.random_range(0..seeds.len())];
        let b = &seeds[rng.random_range(0..seeds.len())];
        let input = mutate(&mut rng, a, b);
        let result = std::panic::catch_unwind(|| body(&input));
        if result.is_err() {
            panic!("{target}: crash on input {input:?} (add it to fuzz/corpus/{target}/)");
        }
    }
}

#[test]
fn gguf_reader() {
    run("gguf", bodies::gguf);
}

#[test]
fn tokenizer_round_trip() {
    run("tokenizer_round_trip", bodies::tokenizer_round_trip);
}

#[test]
fn chat_template() {
    run("chat_template", bodies::chat_template);
}

#[test]
fn request_json() {
    run("request_json", bodies::request_json);
}
