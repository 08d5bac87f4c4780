//! Speculative decoding's place in the loop: after a step is committed, count what its
//! drafts earned and propose the next drafts (`crate::speculative` proposes, the scheduler
//! schedules them, the sampler verifies them).

use super::draft_model::DraftWant;
use super::metrics::EngineMetrics;
use super::request_table::RequestTable;
use super::runner::ModelRunner;
use crate::kernels::Backend;
use crate::scheduler::{Scheduler, SeqId, StepPlan};

/// `sampled`: the committed step's tokens, in plan order, several in a row for a sequence
/// that verified a draft.
pub(super) fn after_commit<B: Backend>(
    plan: &StepPlan,
    sampled: &[(SeqId, u32)],
    scheduler: &mut Scheduler,
    runner: &mut ModelRunner<B>,
    table: &RequestTable,
    metrics: &EngineMetrics,
    max_model_len: usize,
) {
    let (Some(speculator), draft_model) = runner.drafting_mut() else {
        return;
    };
    let mut wants = Vec::new();
    let decodes = scheduler.num_running();
    let propose = speculator.enabled_at(decodes);
    let mut at = 0;
    for entry in plan.seqs.iter().filter(|s| s.sample) {
        let seq_id = entry.seq_id;
        let n = (sampled[at..].iter())
            .take_while(|(s, _)| *s == seq_id)
            .count();
        at += n;
        // Gone from the scheduler when it just ended.
        let tokens = scheduler.token_ids(seq_id);
        let drafted = entry.draft_token_ids.len();
        if drafted > 0 && n > 0 {
            let accepted = n - 1;
            metrics.spec_decode_num_drafts_total.inc();
            (metrics.spec_decode_num_draft_tokens_total).inc_by(drafted as u64);
            (metrics.spec_decode_num_accepted_tokens_total).inc_by(accepted as u64);
            for pos in 0..accepted {
                (metrics.spec_decode_num_accepted_tokens_per_pos_total)
                    .with_label_values(&[&pos.to_string()])
                    .inc();
            }
            speculator.record(seq_id, drafted, accepted, tokens.map_or(0, <[u32]>::len));
        }
        let Some(tokens) = tokens.filter(|_| propose) else {
            continue;
        };
        let Some(room) = table.draft_room(seq_id, tokens.len(), max_model_len) else {
            continue;
        };
        if draft_model.is_some() {
            let len = speculator.draft_len(seq_id, tokens.len(), room, decodes);
            if len > 0 {
                let tokens = tokens.to_vec();
                wants.push(DraftWant {
                    seq_id,
                    tokens,
                    len,
                });
            }
            continue;
        }
        let draft = speculator.propose(seq_id, tokens, room, decodes);
        scheduler.set_draft(seq_id, draft);
    }
    let Some(draft_model) = draft_model.filter(|_| !wants.is_empty()) else {
        return;
    };
    let started = std::time::Instant::now();
    match draft_model.propose(&wants) {
        Ok((drafts, passes)) => {
            if passes > 0 {
                speculator.observe_draft_pass(started.elapsed().as_secs_f64() / passes as f64);
            }
            for (w, draft) in wants.iter().zip(drafts) {
                scheduler.set_draft(w.seq_id, &draft);
            }
        }
        // The target decodes on without drafts: a draft model's failure costs only speed.
        Err(e) => tracing::warn!("draft model: {e}"),
    }
}
