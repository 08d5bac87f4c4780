//! Flags that the `sluice` binary must refuse before it loads anything.

use std::process::Command;

/// `--enable-fault-injection` arms test-only faults: a binary built without the
/// `fault-injection` feature refuses it at once; one built with it (the default) goes on to
/// load the model (here: fails on the missing file, naming it).
#[test]
fn fault_injection_needs_a_binary_built_for_it() {
    let missing = "/nonexistent/sluice-cli-flags-test.gguf";
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "serve",
            "--enable-fault-injection",
            "--port",
            "0",
            "--model",
            missing,
        ])
        .output()
        .expect("running sluice");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "fault-injection") {
        assert!(stderr.contains(missing), "{stderr}");
    } else {
        assert!(stderr.contains("not built into this binary"), "{stderr}");
        assert!(
            !stderr.contains(missing),
            "refused only after loading: {stderr}"
        );
    }
}
