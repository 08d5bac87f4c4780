//! The bytes of stored files, one per id under `<data-dir>/files/`. A file is written to a
//! temporary name, fsynced, renamed into place and the directory fsynced: after a crash a
//! file is whole or absent, never partial.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::JobError;

#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

/// Ids are ours (`file-…`): anything else (a path, a dot) names no file.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Writes `bytes` to `path` durably: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), JobError> {
    let dir = path
        .parent()
        .ok_or_else(|| JobError::Internal(format!("{} has no directory", path.display())))?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        JobError::Io {
            context: format!("writing {}", path.display()),
            source: e,
        }
    })
}

impl FileStore {
    pub fn open(dir: PathBuf) -> Result<FileStore, JobError> {
        std::fs::create_dir_all(&dir)
            .map_err(JobError::io(format!("creating {}", dir.display())))?;
        Ok(FileStore { dir })
    }

    /// Writes and removes a probe file: fails when the directory is read-only or full.
    pub fn check_writable(&self) -> Result<(), JobError> {
        let probe = self.dir.join(".write-check");
        write_atomic(&probe, &[0u8; 4096])?;
        std::fs::remove_file(&probe).map_err(JobError::io(format!("removing {}", probe.display())))
    }

    fn path(&self, id: &str) -> Result<PathBuf, JobError> {
        if !valid_id(id) {
            return Err(JobError::Internal(format!("invalid file id `{id}`")));
        }
        Ok(self.dir.join(format!("{id}.jsonl")))
    }

    pub async fn write(&self, id: &str, bytes: Vec<u8>) -> Result<(), JobError> {
        let path = self.path(id)?;
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(|e| JobError::Internal(format!("a file task failed: {e}")))?
    }

    /// The file's bytes; `None` when it is absent.
    pub async fn read(&self, id: &str) -> Result<Option<Vec<u8>>, JobError> {
        let path = self.path(id)?;
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(JobError::Io {
                context: format!("reading {}", path.display()),
                source: e,
            }),
        }
    }

    pub async fn remove(&self, id: &str) -> Result<(), JobError> {
        let path = self.path(id)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(JobError::Io {
                context: format!("removing {}", path.display()),
                source: e,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_atomic_writes() {
        assert!(valid_id("file-abc_1"));
        assert!(!valid_id("../etc"));
        assert!(!valid_id(""));
        let dir = std::env::temp_dir().join(format!("sluice-files-{}", std::process::id()));
        let store = FileStore::open(dir.clone()).unwrap();
        store.check_writable().unwrap();
        let p = store.path("file-x").unwrap();
        write_atomic(&p, b"one\n").unwrap();
        write_atomic(&p, b"two\n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two\n");
        let leftovers = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary files left");
        let _ = std::fs::remove_dir_all(dir);
    }
}
