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

/// The 8-bit KV cache is the CPU backend's: asking a GPU for it is refused before the GPU is
/// probed or the model opened, whether or not this machine has one.
#[test]
fn int8_kv_cache_is_refused_on_a_gpu() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "serve",
            "--device",
            "cuda:0",
            "--kv-cache-dtype",
            "int8",
            "--port",
            "0",
            "--model",
            "/nonexistent/sluice-cli-flags-test.gguf",
        ])
        .output()
        .expect("running sluice");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let refusal = "--kv-cache-dtype int8 runs on the CPU backend only";
    assert!(stderr.contains(refusal), "{stderr}");
    assert!(
        !stderr.contains("nonexistent"),
        "refused only after opening: {stderr}"
    );
}
