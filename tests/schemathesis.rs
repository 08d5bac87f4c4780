//! schemathesis against the real server's own `/openapi.json`: about a thousand generated
//! requests (valid and not), none may yield a 5xx. Runs `scripts/schemathesis.sh`, which
//! installs schemathesis into `~/.cache/sluice/schemathesis-venv` on first use (~30 s after).

use crate::api_support;

use std::process::Command;

#[test]
fn no_generated_request_yields_a_5xx() {
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/schemathesis.sh"
        ))
        .arg("30")
        .env("SLUICE_BIN", api_support::sluice_bin())
        .output()
        .expect("running scripts/schemathesis.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("passed"), "{stdout}");
}
