//! Compiles every `kernels-cuda/*.cu` through NVRTC for sm_80 and sm_90, with no GPU needed.
//!
//! NVRTC comes from its PyPI wheel, installed once into `<cache>/nvrtc-venv` (the cache is
//! `$SLUICE_CACHE` or `~/.cache/sluice`). cudarc `dlopen`s `libnvrtc.so.12` by name, so the
//! test re-runs itself as a child process with the wheel's `lib` directory on
//! `LD_LIBRARY_PATH` (the loader reads it only at process start). When libnvrtc is already
//! loadable (a machine with the CUDA toolkit), it compiles in-process.
#![cfg(feature = "cuda")]

use crate::api_support::venv;

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice::kernels::cuda::nvrtc;

const NVRTC_WHEEL: &str = "nvidia-cuda-nvrtc-cu12==12.9.86";
const CHILD_ENV: &str = "SLUICE_NVRTC_TEST_CHILD";

/// `<cache>/nvrtc-venv` with the NVRTC wheel.
fn nvrtc_venv() -> PathBuf {
    venv::pip_venv("nvrtc-venv", NVRTC_WHEEL)
}

/// The directory holding `libnvrtc.so.12` inside the venv.
fn nvrtc_lib_dir(venv: &Path) -> PathBuf {
    let lib = venv.join("lib");
    let entries = std::fs::read_dir(&lib).expect("the venv's lib directory");
    for e in entries.flatten() {
        let dir = e.path().join("site-packages/nvidia/cuda_nvrtc/lib");
        if dir.join("libnvrtc.so.12").exists() {
            return dir;
        }
    }
    panic!("no libnvrtc.so.12 under {}", lib.display());
}

fn compile_all() {
    let (major, minor) = nvrtc::version().expect("NVRTC version");
    let mut failures = Vec::new();
    let mut count = 0;
    for src in nvrtc::SOURCES {
        let expanded = nvrtc::expand(src.name, src.source).expect("expanding includes");
        for arch in ["sm_80", "sm_90"] {
            match nvrtc::compile_cubin(src.name, &expanded, arch) {
                Ok(cubin) => {
                    assert!(!cubin.is_empty(), "{} {arch}: empty CUBIN", src.name);
                    count += 1;
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    eprintln!("NVRTC {major}.{minor}: compiled {count} kernel files to CUBIN");
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if std::env::var_os(CHILD_ENV).is_some() || nvrtc::is_available() {
        compile_all();
        return;
    }
    let dir = nvrtc_lib_dir(&nvrtc_venv());
    let mut path = dir.into_os_string();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        path.push(":");
        path.push(old);
    }
    // This test's name as libtest knows it: its module path without the crate's name.
    let full = concat!(module_path!(), "::every_kernel_compiles_for_sm80_and_sm90");
    let name = full.split_once("::").map_or(full, |(_, name)| name);
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new(exe)
        .args(["--exact", name, "--nocapture"])
        .env(CHILD_ENV, "1")
        .env("LD_LIBRARY_PATH", path)
        .output()
        .expect("re-running the test with LD_LIBRARY_PATH");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the NVRTC child failed:\n{text}");
    assert!(text.contains("compiled 16 kernel files"), "{text}");
}
