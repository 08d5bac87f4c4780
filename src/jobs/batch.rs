//! A batch's life: `validating` (the input file read, each line checked and stored),
//! `in_progress` (pending lines run, at most `max_concurrent` at once across all jobs, and
//! `busy_concurrent` while online requests are in the engine),
//! `finalizing` (the output and error files written), then `completed`; or `cancelling` →
//! `cancelled`, `expired` when the completion window passes, `failed` when the input cannot
//! be read. One task drives a batch; it resumes from the stored status after a restart.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinSet;

use super::lines::{self, Endpoint};
use super::store::{BatchRow, Counts, FileRow, NewLine, PendingLine, TIME_COLUMNS};
use super::{unix_now, Failure, JobError, JobService, JOB_PRIORITY};

/// The completion window as seconds: `24h`, or for shorter runs `<n>h`, `<n>m`, `<n>s`.
pub fn parse_window(window: &str) -> Option<i64> {
    // The unit is the last character, which a client may make multi-byte: strip it as a
    // char, never split at a byte offset.
    let (num, scale) = if let Some(num) = window.strip_suffix('h') {
        (num, 3600)
    } else if let Some(num) = window.strip_suffix('m') {
        (num, 60)
    } else {
        (window.strip_suffix('s')?, 1)
    };
    let n: i64 = num.parse().ok().filter(|n| *n > 0)?;
    n.checked_mul(scale)
}

/// The OpenAI batch object.
pub fn batch_json(b: &BatchRow, counts: Counts) -> Value {
    let mut v = json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": b.errors.as_deref().and_then(|e| serde_json::from_str::<Value>(e).ok()),
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "expires_at": b.expires_at,
        "request_counts": {"total": counts.0, "completed": counts.1, "failed": counts.2},
        "metadata": b.metadata.as_deref().and_then(|m| serde_json::from_str::<Value>(m).ok()),
    });
    for (name, t) in TIME_COLUMNS.iter().zip(b.times) {
        v[*name] = json!(t);
    }
    v
}

/// How `run_lines` ended.
enum Stop {
    Done,
    Cancelled,
    Expired,
    /// The server is going down: leave the batch as it is, to resume at the next start.
    Shutdown,
}

impl JobService {
    /// A new batch, `validating`, and its runner.
    pub async fn create_batch(
        self: &Arc<Self>,
        input_file_id: String,
        endpoint: Endpoint,
        window: String,
        window_secs: i64,
        metadata: Option<Value>,
    ) -> Result<BatchRow, JobError> {
        let now = unix_now();
        let row = BatchRow {
            id: format!("batch_{}", uuid::Uuid::new_v4().simple()),
            input_file_id,
            endpoint: endpoint.url().to_string(),
            completion_window: window,
            status: "validating".into(),
            metadata: metadata.map(|m| m.to_string()),
            errors: None,
            output_file_id: None,
            error_file_id: None,
            created_at: now,
            expires_at: now.saturating_add(window_secs),
            times: [None; 7],
        };
        self.store.insert_batch(row.clone()).await?;
        self.spawn_batch(row.id.clone());
        Ok(row)
    }

    /// Asks a batch to stop; `None` when there is no such batch.
    pub async fn cancel_batch(&self, id: &str) -> Result<Option<BatchRow>, JobError> {
        if self
            .store
            .request_cancel(id.to_string(), unix_now())
            .await?
            .is_none()
        {
            return Ok(None);
        }
        self.signal_cancel(id);
        self.store.batch(id.to_string()).await
    }

    pub(super) fn spawn_batch(self: &Arc<Self>, id: String) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut cancel = this.register(&id);
            if let Err(e) = this.drive_batch(&id, &mut cancel).await {
                tracing::error!("batch {id} stopped: {e}");
            }
            this.unregister(&id);
        });
    }

    async fn drive_batch(
        &self,
        id: &str,
        cancel: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), JobError> {
        loop {
            let Some(b) = self.store.batch(id.to_string()).await? else {
                return Ok(());
            };
            match b.status.as_str() {
                "validating" => self.validate(&b).await?,
                "in_progress" => match self.run_lines(&b, cancel).await? {
                    Stop::Shutdown => return Ok(()),
                    Stop::Cancelled => continue,
                    Stop::Expired => {
                        return self
                            .finalize(&b, "expired", "expired_at", "batch_expired")
                            .await
                    }
                    Stop::Done => {
                        let id = b.id.clone();
                        let now = unix_now();
                        self.store
                            .set_batch_status(id, "finalizing", "finalizing_at", now)
                            .await?;
                    }
                },
                "finalizing" => {
                    return self
                        .finalize(&b, "completed", "completed_at", "batch_failed")
                        .await
                }
                "cancelling" => {
                    return self
                        .finalize(&b, "cancelled", "cancelled_at", "batch_cancelled")
                        .await
                }
                _ => return Ok(()),
            }
        }
    }

    /// Reads the input file into lines; a line that cannot run is failed now, with its
    /// number; a missing input file fails the batch.
    async fn validate(&self, b: &BatchRow) -> Result<(), JobError> {
        let Some(bytes) = self.files.read(&b.input_file_id).await? else {
            let errors = json!({"object": "list", "data": [{
                "code": "missing_input_file",
                "message": format!("the input file {} no longer exists", b.input_file_id),
                "param": "input_file_id", "line": null,
            }]});
            return self
                .store
                .fail_batch(b.id.clone(), errors.to_string(), unix_now())
                .await;
        };
        let endpoint = Endpoint::from_url(&b.endpoint);
        let mut out = Vec::new();
        for (line_no, parsed) in lines::parse_file(&bytes, endpoint) {
            out.push(match parsed {
                Ok(l) => NewLine::Pending(PendingLine {
                    line_no: line_no as i64,
                    custom_id: l.custom_id,
                    url: l.endpoint.url().to_string(),
                    body: l.body.to_string(),
                }),
                Err(e) => NewLine::Failed {
                    line_no: line_no as i64,
                    custom_id: e.custom_id.clone(),
                    record: e.record().to_string(),
                },
            });
        }
        self.store.start_batch(b.id.clone(), out, unix_now()).await
    }

    /// Runs the pending lines until none is left, or a cancel, the window's end or shutdown.
    async fn run_lines(
        &self,
        b: &BatchRow,
        cancel: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Stop, JobError> {
        let Some(exec) = self.executor() else {
            return Ok(Stop::Shutdown);
        };
        let mut pending = self
            .store
            .pending_lines(b.id.clone())
            .await?
            .into_iter()
            .peekable();
        let left = u64::try_from(b.expires_at - unix_now()).unwrap_or(0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(left);
        let mut running: JoinSet<Result<(), JobError>> = JoinSet::new();
        let stop = loop {
            if exec.shutting_down() {
                break Stop::Shutdown;
            }
            if pending.peek().is_none() && running.is_empty() {
                break Stop::Done;
            }
            let more = pending.peek().is_some();
            let admit = more && self.admit_more(&*exec);
            tokio::select! {
                biased;
                Ok(()) = cancel.changed() => break Stop::Cancelled,
                _ = tokio::time::sleep_until(deadline) => break Stop::Expired,
                Some(done) = running.join_next(), if !running.is_empty() => {
                    done.map_err(|e| JobError::Internal(format!("a batch line task failed: {e}")))??;
                }
                // Online requests came: look again soon.
                _ = tokio::time::sleep(Duration::from_millis(50)), if more && !admit => {}
                permit = self.permits.clone().acquire_owned(), if admit => {
                    let permit = permit.map_err(|e| JobError::Internal(e.to_string()))?;
                    let Some(line) = pending.next() else { continue };
                    let (exec, store, id) = (exec.clone(), self.store.clone(), b.id.clone());
                    running.spawn(async move {
                        let _permit = permit;
                        let Some((status, record)) = run_line(&*exec, &line).await else {
                            return Ok(());
                        };
                        store.finish_line(id, line.line_no, status, record.to_string()).await
                    });
                }
            }
        };
        // Dropping a line's future drops its request stream, which aborts it in the engine.
        running.abort_all();
        while running.join_next().await.is_some() {}
        Ok(stop)
    }

    /// Writes the output and error files and sets the final status; lines still pending
    /// become errors with `code`.
    async fn finalize(
        &self,
        b: &BatchRow,
        status: &'static str,
        time_column: &'static str,
        code: &'static str,
    ) -> Result<(), JobError> {
        let message = match code {
            "batch_cancelled" => "the batch was cancelled before this line ran",
            "batch_expired" => "the batch's completion window passed before this line ran",
            _ => "this line did not run",
        };
        let records = self
            .store
            .close_lines(b.id.clone(), move |custom_id, line_no| {
                lines::line_error_record(Some(custom_id), line_no as usize, code, message)
                    .to_string()
            })
            .await?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for (s, record) in records {
            let buf = if s == "done" { &mut out } else { &mut err };
            buf.extend_from_slice(record.as_bytes());
            buf.push(b'\n');
        }
        let now = unix_now();
        let mut files = Vec::new();
        let mut ids = [None, None];
        for (slot, (suffix, bytes)) in [("output", out), ("errors", err)].into_iter().enumerate() {
            if bytes.is_empty() {
                continue;
            }
            let file_id = format!("file-{}-{suffix}", b.id);
            let len = bytes.len() as u64;
            self.files.write(&file_id, bytes).await?;
            files.push(FileRow {
                id: file_id.clone(),
                object: "file",
                status: "processed",
                bytes: len,
                created_at: now,
                filename: format!("{}_{suffix}.jsonl", b.id),
                purpose: "batch_output".into(),
            });
            ids[slot] = Some(file_id);
        }
        self.store
            .finish_batch(b.id.clone(), files, ids, (status, time_column), now)
            .await
    }
}

/// Runs one line: its status (`done` or `error`) and output record, or `None` when the
/// server is going down (the line stays pending). Refusals for a passing reason (a full
/// queue) are retried with backoff.
async fn run_line(exec: &dyn super::Executor, line: &PendingLine) -> Option<(&'static str, Value)> {
    let body: Value = match serde_json::from_str(&line.body) {
        Ok(b) => b,
        Err(e) => {
            let msg = format!("the stored line is unreadable: {e}");
            let rec = lines::line_error_record(
                Some(&line.custom_id),
                line.line_no as usize,
                "internal_error",
                &msg,
            );
            return Some(("error", rec));
        }
    };
    let Some(endpoint) = Endpoint::from_url(&line.url) else {
        let msg = format!("unknown url `{}`", line.url);
        let rec = lines::line_error_record(
            Some(&line.custom_id),
            line.line_no as usize,
            "invalid_url",
            &msg,
        );
        return Some(("error", rec));
    };
    let mut attempt = 0;
    let outcome = loop {
        match exec.execute(endpoint, body.clone(), JOB_PRIORITY).await {
            Err(Failure { retry: true, .. }) if !exec.shutting_down() => {
                tokio::time::sleep(JobService::retry_delay(attempt)).await;
                attempt += 1;
            }
            other => break other,
        }
    };
    if exec.shutting_down() {
        return None;
    }
    Some(match outcome {
        Ok(v) => ("done", lines::success_record(&line.custom_id, v)),
        Err(f) => (
            "error",
            lines::failure_record(&line.custom_id, f.status, f.body),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        assert_eq!(parse_window("24h"), Some(86400));
        assert_eq!(parse_window("90s"), Some(90));
        assert_eq!(parse_window("2m"), Some(120));
        for bad in [
            "",
            "h",
            "0h",
            "-1h",
            "24",
            "1d",
            "1.5h",
            "\u{2a45f}",
            "1\u{e9}",
            "é",
        ] {
            assert_eq!(parse_window(bad), None, "{bad}");
        }
    }
}
