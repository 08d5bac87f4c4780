//! The async jobs' rows in the job database (`store.rs` holds the connection and the
//! schema).

use rusqlite::{params, OptionalExtension, Row};

use super::store::Store;
use super::JobError;

/// An async job's row.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub endpoint: String,
    pub body: String,
    pub status: String,
    pub webhook_url: Option<String>,
    pub result: Option<String>,
    pub error: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

fn job_row(r: &Row) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        id: r.get(0)?,
        endpoint: r.get(1)?,
        body: r.get(2)?,
        status: r.get(3)?,
        webhook_url: r.get(4)?,
        result: r.get(5)?,
        error: r.get(6)?,
        created_at: r.get(7)?,
        started_at: r.get(8)?,
        finished_at: r.get(9)?,
    })
}

impl Store {
    pub async fn insert_job(&self, j: JobRow) -> Result<(), JobError> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO async_jobs (id, endpoint, body, status, webhook_url, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    j.id,
                    j.endpoint,
                    j.body,
                    j.status,
                    j.webhook_url,
                    j.created_at
                ],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn job(&self, id: String) -> Result<Option<JobRow>, JobError> {
        self.call(move |c| {
            c.query_row(
                "SELECT id, endpoint, body, status, webhook_url, result, error, created_at, \
                 started_at, finished_at FROM async_jobs WHERE id = ?1",
                [id],
                job_row,
            )
            .optional()
        })
        .await
    }

    pub async fn unfinished_jobs(&self) -> Result<Vec<String>, JobError> {
        self.call(|c| {
            let mut st = c.prepare(
                "SELECT id FROM async_jobs WHERE status IN ('queued', 'in_progress') ORDER BY rowid",
            )?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    pub async fn start_job(&self, id: String, now: i64) -> Result<bool, JobError> {
        self.call(move |c| {
            c.execute(
                "UPDATE async_jobs SET status = 'in_progress', started_at = ?2 \
                 WHERE id = ?1 AND status IN ('queued', 'in_progress')",
                params![id, now],
            )
            .map(|n| n > 0)
        })
        .await
    }

    /// A job's end; only an unfinished job changes. Whether it changed. A job with a webhook
    /// (completed, failed or cancelled) gets its delivery row (`webhook.rs`) in the same transaction,
    /// so a job recorded as finished always has its webhook pending or done.
    pub async fn finish_job(
        &self,
        id: String,
        status: &'static str,
        result: Option<String>,
        error: Option<String>,
        now: i64,
    ) -> Result<bool, JobError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            let changed = tx.execute(
                "UPDATE async_jobs SET status = ?2, result = ?3, error = ?4, finished_at = ?5 \
                 WHERE id = ?1 AND status IN ('queued', 'in_progress')",
                params![id, status, result, error, now],
            )? > 0;
            if changed {
                tx.execute(
                    "INSERT OR IGNORE INTO webhooks (job_id, state, attempts, next_at_ms) \
                     SELECT id, 'pending', 0, ?2 FROM async_jobs WHERE id = ?1 \
                     AND webhook_url IS NOT NULL",
                    params![id, now.saturating_mul(1000)],
                )?;
            }
            tx.commit()?;
            Ok(changed)
        })
        .await
    }
}
