//! The tests' cache, under the user's cache directory (never the clone): Python virtual
//! environments, created once per requirement, and scratch paths for whatever is made there
//! and renamed into place, safe when several tests race to make the same thing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub fn cache_dir() -> PathBuf {
    sluice::assets::cache_dir().expect("a cache directory (set SLUICE_CACHE)")
}

/// `<cache>/<name>` with `requirement` pip-installed (several, separated by spaces). A marker names the requirement, so a
/// change of pin replaces an older environment; concurrent creators each build a temporary
/// venv and rename it into place, and the loser removes its own.
pub fn pip_venv(name: &str, requirement: &str) -> PathBuf {
    // One creator per environment in this process: the other tests that need it wait for it
    // rather than installing it again beside it.
    static CREATING: Mutex<BTreeMap<String, Arc<Mutex<()>>>> = Mutex::new(BTreeMap::new());
    let lock = {
        let mut locks = CREATING.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(name.to_string()).or_default())
    };
    let _creating = lock.lock().unwrap_or_else(|e| e.into_inner());
    let venv = cache_dir().join(name);
    let marker_name = format!(".req-{}", requirement.replace(['/', ' '], "_"));
    let marker = venv.join(&marker_name);
    if marker.exists() && venv.join("bin").join("python").exists() {
        return venv;
    }
    let tmp = scratch_beside(&venv, "tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(cache_dir()).expect("creating the cache directory");
    run_ok(Command::new("python3").args(["-m", "venv"]).arg(&tmp));
    run_ok(
        Command::new(tmp.join("bin").join("python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(requirement.split_whitespace()),
    );
    std::fs::write(tmp.join(&marker_name), b"").expect("writing the venv marker");
    if venv.exists() && !marker.exists() {
        // An older environment: replace it.
        let _ = std::fs::remove_dir_all(&venv);
    }
    if std::fs::rename(&tmp, &venv).is_err() {
        // Another test created it first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    venv
}

/// A path beside `path` that no other test, in this process or another, writes: for a file
/// or directory made there and renamed into place, so that racing makers never share one.
pub fn scratch_beside(path: &Path, what: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().expect("a file name").to_os_string();
    name.push(format!(".{what}-{}-{n}", std::process::id()));
    path.with_file_name(name)
}

pub fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("running a set-up command");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
