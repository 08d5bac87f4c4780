//! The jobs' durable state: one SQLite database (`jobs.db`, WAL, `synchronous=FULL`) under
//! the data directory. A committed transaction survives SIGKILL and power loss; every state
//! change of a file, batch, batch line or async job is one transaction. Tables: `files` (uploaded and produced JSONL files; their bytes live beside the database),
//! `batches` (one row per batch, its timestamps and file ids), `batch_lines` (one row per input
//! line: `pending`, `done` or `error`, with its output record once finished), `async_jobs` and
//! `webhooks` (a finished job's delivery state, `webhook.rs`).
//! A batch's `request_counts` are counted from its lines, so they cannot drift.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::JobError;

pub use super::store_files::{FileOrder, FileRow};
pub use super::store_jobs::JobRow;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, input_file_id TEXT NOT NULL, endpoint TEXT NOT NULL,
    completion_window TEXT NOT NULL, status TEXT NOT NULL, metadata TEXT,
    errors TEXT, output_file_id TEXT, error_file_id TEXT,
    created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, in_progress_at INTEGER,
    finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER, expired_at INTEGER,
    cancelling_at INTEGER, cancelled_at INTEGER);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT,
    url TEXT, body TEXT, status TEXT NOT NULL, record TEXT,
    PRIMARY KEY (batch_id, line_no));
CREATE TABLE IF NOT EXISTS async_jobs (
    id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, body TEXT NOT NULL, status TEXT NOT NULL,
    webhook_url TEXT, result TEXT, error TEXT, created_at INTEGER NOT NULL,
    started_at INTEGER, finished_at INTEGER);
CREATE TABLE IF NOT EXISTS webhooks (
    job_id TEXT PRIMARY KEY, state TEXT NOT NULL, attempts INTEGER NOT NULL,
    next_at_ms INTEGER NOT NULL, last_error TEXT);
";

/// A batch's row, as stored (the API shapes it).
#[derive(Debug, Clone)]
pub struct BatchRow {
    pub id: String,
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    pub status: String,
    pub metadata: Option<String>,
    pub errors: Option<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    /// `in_progress_at`, `finalizing_at`, `completed_at`, `failed_at`, `expired_at`,
    /// `cancelling_at`, `cancelled_at`.
    pub times: [Option<i64>; 7],
}

/// The names of `BatchRow::times`, in order (each is a column).
pub const TIME_COLUMNS: [&str; 7] = [
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
];

/// A line waiting to run.
#[derive(Debug, Clone)]
pub struct PendingLine {
    pub line_no: i64,
    pub custom_id: String,
    pub url: String,
    pub body: String,
}

/// A line as validation leaves it: to run, or already failed with its record.
#[derive(Debug, Clone)]
pub enum NewLine {
    Pending(PendingLine),
    Failed {
        line_no: i64,
        custom_id: Option<String>,
        record: String,
    },
}

/// `(total, completed, failed)` of a batch.
pub type Counts = (u64, u64, u64);

/// The database; cheap to clone. Calls block (SQLite with fsync): async callers go through
/// `call`.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

const BATCH_COLUMNS: &str = "id, input_file_id, endpoint, completion_window, status, metadata, \
    errors, output_file_id, error_file_id, created_at, expires_at, in_progress_at, \
    finalizing_at, completed_at, failed_at, expired_at, cancelling_at, cancelled_at";

fn batch_row(r: &Row) -> rusqlite::Result<BatchRow> {
    let mut times = [None; 7];
    for (i, t) in times.iter_mut().enumerate() {
        *t = r.get(11 + i)?;
    }
    Ok(BatchRow {
        id: r.get(0)?,
        input_file_id: r.get(1)?,
        endpoint: r.get(2)?,
        completion_window: r.get(3)?,
        status: r.get(4)?,
        metadata: r.get(5)?,
        errors: r.get(6)?,
        output_file_id: r.get(7)?,
        error_file_id: r.get(8)?,
        created_at: r.get(9)?,
        expires_at: r.get(10)?,
        times,
    })
}

impl Store {
    /// Opens (creating) `<dir>/jobs.db` in WAL mode and creates the tables.
    pub fn open(dir: &Path) -> Result<Store, JobError> {
        let conn = Connection::open(dir.join("jobs.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, JobError> {
        let mut conn = self.conn.lock().map_err(|_| JobError::Poisoned)?;
        Ok(f(&mut conn)?)
    }

    /// `with`, off the async runtime.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, JobError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.with(f))
            .await
            .map_err(|e| JobError::Internal(format!("a database task failed: {e}")))?
    }

    pub async fn insert_batch(&self, b: BatchRow) -> Result<(), JobError> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO batches (id, input_file_id, endpoint, completion_window, status, \
                 metadata, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    b.id,
                    b.input_file_id,
                    b.endpoint,
                    b.completion_window,
                    b.status,
                    b.metadata,
                    b.created_at,
                    b.expires_at
                ],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn batch(&self, id: String) -> Result<Option<BatchRow>, JobError> {
        self.call(move |c| {
            c.query_row(
                &format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1"),
                [id],
                batch_row,
            )
            .optional()
        })
        .await
    }

    /// Newest first, those created before `after` (a batch id) when given; `limit + 1` rows
    /// at most, so the caller knows whether there are more. `None` when `after` names no
    /// stored batch (the cursor cannot be placed).
    pub async fn batches(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Option<Vec<BatchRow>>, JobError> {
        self.call(move |c| {
            // One transaction: the cursor's row and the page are read from one snapshot.
            let tx = c.transaction()?;
            let Some(cursor) = cursor_rowid(&tx, "batches", after)? else {
                return Ok(None);
            };
            let mut st = tx.prepare(&format!(
                "SELECT {BATCH_COLUMNS} FROM batches WHERE ?1 IS NULL OR rowid < ?1 \
                 ORDER BY rowid DESC LIMIT ?2"
            ))?;
            let rows = st.query_map(params![cursor, limit as i64 + 1], batch_row)?;
            rows.collect::<Result<Vec<_>, _>>().map(Some)
        })
        .await
    }

    /// Batches not yet in a final state (to resume at start-up).
    pub async fn unfinished_batches(&self) -> Result<Vec<String>, JobError> {
        self.call(|c| {
            let mut st = c.prepare(
                "SELECT id FROM batches WHERE status IN \
                 ('validating', 'in_progress', 'finalizing', 'cancelling') ORDER BY rowid",
            )?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    /// Sets the status and its timestamp column (one of `TIME_COLUMNS`).
    pub async fn set_batch_status(
        &self,
        id: String,
        status: &'static str,
        time_column: &'static str,
        now: i64,
    ) -> Result<(), JobError> {
        debug_assert!(TIME_COLUMNS.contains(&time_column));
        self.call(move |c| {
            c.execute(
                &format!("UPDATE batches SET status = ?2, {time_column} = ?3 WHERE id = ?1"),
                params![id, status, now],
            )
            .map(|_| ())
        })
        .await
    }

    /// Marks a batch cancelling unless it is already final; returns the status after.
    pub async fn request_cancel(&self, id: String, now: i64) -> Result<Option<String>, JobError> {
        self.call(move |c| {
            c.execute(
                "UPDATE batches SET status = 'cancelling', cancelling_at = ?2 WHERE id = ?1 \
                 AND status IN ('validating', 'in_progress')",
                params![id, now],
            )?;
            c.query_row("SELECT status FROM batches WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
        })
        .await
    }

    /// A failed batch (its input could not be read), with the error list.
    pub async fn fail_batch(&self, id: String, errors: String, now: i64) -> Result<(), JobError> {
        self.call(move |c| {
            c.execute(
                "UPDATE batches SET status = 'failed', failed_at = ?2, errors = ?3 WHERE id = ?1",
                params![id, now, errors],
            )
            .map(|_| ())
        })
        .await
    }

    /// Validation's result, in one transaction: the lines, and `in_progress` (unless it was
    /// cancelled meanwhile).
    pub async fn start_batch(
        &self,
        id: String,
        lines: Vec<NewLine>,
        now: i64,
    ) -> Result<(), JobError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM batch_lines WHERE batch_id = ?1", [&id])?;
            {
                let mut st = tx.prepare(
                    "INSERT INTO batch_lines (batch_id, line_no, custom_id, url, body, status, record) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                for l in lines {
                    match l {
                        NewLine::Pending(p) => st.execute(params![
                            id, p.line_no, p.custom_id, p.url, p.body, "pending", None::<String>
                        ])?,
                        NewLine::Failed { line_no, custom_id, record } => st.execute(params![
                            id, line_no, custom_id, None::<String>, None::<String>, "error", record
                        ])?,
                    };
                }
            }
            tx.execute(
                "UPDATE batches SET status = 'in_progress', in_progress_at = ?2 \
                 WHERE id = ?1 AND status = 'validating'",
                params![id, now],
            )?;
            tx.commit()
        })
        .await
    }

    pub async fn pending_lines(&self, id: String) -> Result<Vec<PendingLine>, JobError> {
        self.call(move |c| {
            let mut st = c.prepare(
                "SELECT line_no, custom_id, url, body FROM batch_lines \
                 WHERE batch_id = ?1 AND status = 'pending' ORDER BY line_no",
            )?;
            let rows = st.query_map([id], |r| {
                Ok(PendingLine {
                    line_no: r.get(0)?,
                    custom_id: r.get(1)?,
                    url: r.get(2)?,
                    body: r.get(3)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// A line's end (`done` or `error`) with its output record; only a pending line changes,
    /// so a line is answered once.
    pub async fn finish_line(
        &self,
        id: String,
        line_no: i64,
        status: &'static str,
        record: String,
    ) -> Result<(), JobError> {
        self.call(move |c| {
            c.execute(
                "UPDATE batch_lines SET status = ?3, record = ?4, body = NULL \
                 WHERE batch_id = ?1 AND line_no = ?2 AND status = 'pending'",
                params![id, line_no, status, record],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn counts(&self, id: String) -> Result<Counts, JobError> {
        self.call(move |c| {
            c.query_row(
                "SELECT COUNT(*), COALESCE(SUM(status = 'done'), 0), COALESCE(SUM(status = 'error'), 0) \
                 FROM batch_lines WHERE batch_id = ?1",
                [id],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64)),
            )
        })
        .await
    }

    /// Closes the batch's lines, in one transaction: each still pending becomes an error with
    /// `close`'s record (`(custom_id, line_no) -> record`), and every line's
    /// `(status, record)` comes back in line order. A line finished later is a no-op, so the
    /// records read here are final.
    pub async fn close_lines(
        &self,
        id: String,
        close: impl Fn(&str, i64) -> String + Send + 'static,
    ) -> Result<Vec<(String, String)>, JobError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            let pending: Vec<(i64, String)> = {
                let mut st = tx.prepare(
                    "SELECT line_no, custom_id FROM batch_lines \
                     WHERE batch_id = ?1 AND status = 'pending'",
                )?;
                let rows = st.query_map([&id], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for (line_no, custom_id) in pending {
                tx.execute(
                    "UPDATE batch_lines SET status = 'error', record = ?3, body = NULL \
                     WHERE batch_id = ?1 AND line_no = ?2",
                    params![id, line_no, close(&custom_id, line_no)],
                )?;
            }
            let records = {
                let mut st = tx.prepare(
                    "SELECT status, record FROM batch_lines WHERE batch_id = ?1 ORDER BY line_no",
                )?;
                let rows = st.query_map([&id], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            tx.commit()?;
            Ok(records)
        })
        .await
    }

    /// The last step, in one transaction: the output files' rows, their ids on the batch, and
    /// the final status.
    pub async fn finish_batch(
        &self,
        id: String,
        files: Vec<FileRow>,
        [output_file_id, error_file_id]: [Option<String>; 2],
        (status, time_column): (&'static str, &'static str),
        now: i64,
    ) -> Result<(), JobError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            for f in files {
                tx.execute(
                    "INSERT OR REPLACE INTO files (id, purpose, filename, bytes, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![f.id, f.purpose, f.filename, f.bytes as i64, f.created_at],
                )?;
            }
            tx.execute(
                &format!(
                    "UPDATE batches SET status = ?2, {time_column} = ?3, output_file_id = ?4, \
                     error_file_id = ?5 WHERE id = ?1"
                ),
                params![id, status, now, output_file_id, error_file_id],
            )?;
            tx.commit()
        })
        .await
    }
}

/// A list's cursor: the rowid of `after` in `table` (`Some(None)` without a cursor), or
/// `None` when `after` names no row, so the page cannot be placed.
pub(super) fn cursor_rowid(
    conn: &Connection,
    table: &str,
    after: Option<String>,
) -> rusqlite::Result<Option<Option<i64>>> {
    let Some(id) = after else {
        return Ok(Some(None));
    };
    conn.query_row(
        &format!("SELECT rowid FROM {table} WHERE id = ?1"),
        [id],
        |r| r.get(0),
    )
    .optional()
    .map(|rowid| rowid.map(Some))
}
