//! Python virtual environments for tests, under the user's cache directory (never the clone):
//! created once per requirement, safely when several tests race to create the same one.

use std::path::PathBuf;
use std::process::Command;

pub fn cache_dir() -> PathBuf {
    sluice::assets::cache_dir().expect("a cache directory (set SLUICE_CACHE)")
}

/// `<cache>/<name>` with `requirement` pip-installed (several, separated by spaces). A marker names the requirement, so a
/// change of pin replaces an older environment; concurrent creators each build a temporary
/// venv and rename it into place, and the loser removes its own.
pub fn pip_venv(name: &str, requirement: &str) -> PathBuf {
    let venv = cache_dir().join(name);
    let marker_name = format!(".req-{}", requirement.replace(['/', ' '], "_"));
    let marker = venv.join(&marker_name);
    if marker.exists() && venv.join("bin").join("python").exists() {
        return venv;
    }
    let tmp = cache_dir().join(format!("{name}.tmp-{}", std::process::id()));
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

pub fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("running a set-up command");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
