//! Compiling `kernels-cuda/*.cu` with NVRTC into CUBIN for one architecture, cached on disk.
//!
//! The sources are embedded in the binary (`include_str!`), so a carried binary needs no source
//! tree. NVRTC sees no host or CUDA headers: `#include "x.cuh"` of our own headers is inlined
//! here before compiling, and the kernels define their own fixed-width types and 16-bit float
//! conversions. The cache key is the SHA-256 of the inlined source, the architecture and the
//! NVRTC version, so a changed kernel, card or compiler never reuses a stale CUBIN.
//! Cache: `$SLUICE_CACHE/kernels/` (else `~/.cache/sluice/kernels/`).

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result, sys};
use sha2::{Digest, Sha256};

/// One kernel family: its file name and source.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub name: &'static str,
    pub source: &'static str,
}

const HEADERS: &[(&str, &str)] = &[
    (
        "common.cuh",
        include_str!("../../../kernels-cuda/common.cuh"),
    ),
    ("quant.cuh", include_str!("../../../kernels-cuda/quant.cuh")),
];

/// Every `.cu` file of `kernels-cuda/`.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "activation.cu",
        source: include_str!("../../../kernels-cuda/activation.cu"),
    },
    KernelSource {
        name: "attention_decode.cu",
        source: include_str!("../../../kernels-cuda/attention_decode.cu"),
    },
    KernelSource {
        name: "attention_prefill.cu",
        source: include_str!("../../../kernels-cuda/attention_prefill.cu"),
    },
    KernelSource {
        name: "embedding.cu",
        source: include_str!("../../../kernels-cuda/embedding.cu"),
    },
    KernelSource {
        name: "gemv.cu",
        source: include_str!("../../../kernels-cuda/gemv.cu"),
    },
    KernelSource {
        name: "norm.cu",
        source: include_str!("../../../kernels-cuda/norm.cu"),
    },
    KernelSource {
        name: "rope_cache.cu",
        source: include_str!("../../../kernels-cuda/rope_cache.cu"),
    },
    KernelSource {
        name: "sampling.cu",
        source: include_str!("../../../kernels-cuda/sampling.cu"),
    },
];

#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    #[error("libnvrtc is not loadable (install the CUDA toolkit or the nvidia-cuda-nvrtc wheel and put its lib directory on LD_LIBRARY_PATH)")]
    Missing,
    #[error("NVRTC {call} failed: {code:?}")]
    Call {
        call: &'static str,
        code: sys::nvrtcResult,
    },
    #[error("compiling {name} for {arch}:\n{log}")]
    Compile {
        name: String,
        arch: String,
        log: String,
    },
    #[error("{0}: an include that is not one of kernels-cuda's headers: {1}")]
    Include(String, String),
}

/// The source with our headers inlined (each at most once, as `#pragma once` would).
pub fn expand(name: &str, source: &str) -> Result<String, NvrtcError> {
    let mut out = String::with_capacity(source.len() * 2);
    let mut seen = Vec::new();
    expand_into(name, source, &mut out, &mut seen)?;
    Ok(out)
}

fn expand_into(
    name: &str,
    source: &str,
    out: &mut String,
    seen: &mut Vec<&'static str>,
) -> Result<(), NvrtcError> {
    for line in source.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("#include") {
            let inc = rest.trim().trim_matches('"');
            let Some(&(h, text)) = HEADERS.iter().find(|(h, _)| *h == inc) else {
                return Err(NvrtcError::Include(
                    name.to_string(),
                    rest.trim().to_string(),
                ));
            };
            if !seen.contains(&h) {
                seen.push(h);
                expand_into(h, text, out, seen)?;
            }
        } else if t != "#pragma once" {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(())
}

fn check(call: &'static str, code: sys::nvrtcResult) -> Result<(), NvrtcError> {
    if code == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(NvrtcError::Call { call, code })
    }
}

/// Whether libnvrtc can be loaded (cudarc panics on first use otherwise).
pub fn is_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's `(major, minor)`.
pub fn version() -> Result<(i32, i32), NvrtcError> {
    if !is_available() {
        return Err(NvrtcError::Missing);
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: two valid out-pointers.
    check("nvrtcVersion", unsafe {
        sys::nvrtcVersion(&mut major, &mut minor)
    })?;
    Ok((major, minor))
}

/// Options every kernel is compiled with, for `arch` such as `sm_90`.
fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--fmad=true".into(),
        "-default-device".into(),
    ]
}

/// Compiles one expanded source to CUBIN for `arch` (`sm_80`, `sm_90`, ...).
pub fn compile_cubin(name: &str, source: &str, arch: &str) -> Result<Vec<u8>, NvrtcError> {
    if !is_available() {
        return Err(NvrtcError::Missing);
    }
    let src = CString::new(source).map_err(|_| NvrtcError::Compile {
        name: name.into(),
        arch: arch.into(),
        log: "NUL byte in source".into(),
    })?;
    let cname = CString::new(name).map_err(|_| NvrtcError::Include(name.into(), name.into()))?;
    let prog = result::create_program(&src, Some(&cname)).map_err(|e| NvrtcError::Call {
        call: "nvrtcCreateProgram",
        code: e.0,
    })?;
    let opts = options(arch);
    // SAFETY: `prog` is a live program until the destroy below.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let out = match compiled {
        Ok(()) => cubin(prog),
        Err(_) => Err(NvrtcError::Compile {
            name: name.into(),
            arch: arch.into(),
            log: program_log(prog),
        }),
    };
    // SAFETY: destroyed once, after its last use.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, NvrtcError> {
    let mut size = 0usize;
    // SAFETY: `prog` compiled successfully; the buffer has the size NVRTC reported.
    unsafe {
        check("nvrtcGetCUBINSize", sys::nvrtcGetCUBINSize(prog, &mut size))?;
        let mut buf = vec![0u8; size];
        check(
            "nvrtcGetCUBIN",
            sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char),
        )?;
        Ok(buf)
    }
}

fn program_log(prog: sys::nvrtcProgram) -> String {
    // SAFETY: `prog` is live; the log is NUL-terminated.
    match unsafe { result::get_program_log(prog) } {
        Ok(log) => unsafe { CStr::from_ptr(log.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
        Err(e) => format!("(no log: {e:?})"),
    }
}

fn cache_dir() -> Option<PathBuf> {
    crate::assets::cache_dir().map(|d| d.join("kernels"))
}

/// The CUBIN of `src` for `arch`, from the disk cache or compiled (and then cached). A cache
/// that cannot be written is only logged: compiling again next start is correct, just slower.
pub fn load_or_compile(src: &KernelSource, arch: &str) -> Result<Vec<u8>, NvrtcError> {
    let expanded = expand(src.name, src.source)?;
    let (major, minor) = version()?;
    let mut h = Sha256::new();
    h.update(expanded.as_bytes());
    h.update(format!("|{arch}|nvrtc {major}.{minor}|{:?}", options(arch)).as_bytes());
    let key: String = h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let stem = src.name.trim_end_matches(".cu");
    let path = cache_dir().map(|d| d.join(format!("{stem}-{arch}-{key}.cubin")));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            if !bytes.is_empty() {
                return Ok(bytes);
            }
        }
    }
    let bytes = compile_cubin(src.name, &expanded, arch)?;
    if let Some(p) = &path {
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        let written = p
            .parent()
            .map(std::fs::create_dir_all)
            .unwrap_or(Ok(()))
            .and_then(|_| std::fs::write(&tmp, &bytes))
            .and_then(|_| std::fs::rename(&tmp, p));
        if let Err(e) = written {
            tracing::warn!("could not cache {} at {}: {e}", src.name, p.display());
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_inlined_once() {
        let s = expand("gemv.cu", SOURCES[4].source).expect("expands");
        assert_eq!(s.matches("typedef unsigned char u8;").count(), 1);
        assert!(!s.lines().any(|l| l.trim_start().starts_with("#include")));
        assert!(!s.contains("#pragma once"));
    }

    #[test]
    fn unknown_includes_are_errors() {
        assert!(expand("x.cu", "#include <cstdint>\n").is_err());
    }
}
