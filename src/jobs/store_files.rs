//! The files' rows in the job database (`store.rs` holds the connection and the schema; the
//! bytes live in `files.rs`). Files are listed in the order they were stored (`rowid`, which
//! follows `created_at`), so a page's cursor is the id of the last file of the page before.

use rusqlite::{params, OptionalExtension, Row};

use super::store::Store;
use super::JobError;

/// A stored file's row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileRow {
    pub id: String,
    pub object: &'static str,
    pub bytes: u64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    /// Always `processed`: a file is stored whole or not at all.
    pub status: &'static str,
}

/// The order of a file listing, by creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOrder {
    /// Oldest first.
    Asc,
    /// Newest first (OpenAI's default).
    Desc,
}

fn file_row(r: &Row) -> rusqlite::Result<FileRow> {
    Ok(FileRow {
        id: r.get(0)?,
        object: "file",
        purpose: r.get(1)?,
        filename: r.get(2)?,
        bytes: r.get::<_, i64>(3)?.max(0) as u64,
        created_at: r.get(4)?,
        status: "processed",
    })
}

impl Store {
    pub async fn insert_file(&self, f: FileRow) -> Result<(), JobError> {
        self.call(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO files (id, purpose, filename, bytes, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![f.id, f.purpose, f.filename, f.bytes as i64, f.created_at],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn file(&self, id: String) -> Result<Option<FileRow>, JobError> {
        self.call(move |c| {
            c.query_row(
                "SELECT id, purpose, filename, bytes, created_at FROM files WHERE id = ?1",
                [id],
                file_row,
            )
            .optional()
        })
        .await
    }

    /// One page of files, optionally of one purpose, in `order`, those past the file `after`
    /// when given; `limit + 1` rows at most, so the caller knows whether there are more.
    /// `None` when `after` names no stored file (the cursor cannot be placed).
    pub async fn files(
        &self,
        purpose: Option<String>,
        after: Option<String>,
        order: FileOrder,
        limit: usize,
    ) -> Result<Option<Vec<FileRow>>, JobError> {
        self.call(move |c| {
            // One transaction: the cursor's row and the page are read from one snapshot.
            let tx = c.transaction()?;
            let Some(cursor) = super::store::cursor_rowid(&tx, "files", after)? else {
                return Ok(None);
            };
            let sql = match order {
                FileOrder::Desc => {
                    "SELECT id, purpose, filename, bytes, created_at FROM files \
                     WHERE (?1 IS NULL OR purpose = ?1) AND (?2 IS NULL OR rowid < ?2) \
                     ORDER BY rowid DESC LIMIT ?3"
                }
                FileOrder::Asc => {
                    "SELECT id, purpose, filename, bytes, created_at FROM files \
                     WHERE (?1 IS NULL OR purpose = ?1) AND (?2 IS NULL OR rowid > ?2) \
                     ORDER BY rowid ASC LIMIT ?3"
                }
            };
            let mut st = tx.prepare(sql)?;
            let rows = st
                .query_map(
                    params![purpose, cursor, limit.saturating_add(1) as i64],
                    file_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some(rows))
        })
        .await
    }

    /// Whether a row was deleted.
    pub async fn delete_file(&self, id: String) -> Result<bool, JobError> {
        self.call(move |c| {
            c.execute("DELETE FROM files WHERE id = ?1", [id])
                .map(|n| n > 0)
        })
        .await
    }
}
