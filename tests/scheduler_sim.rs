//! A scripted fake runner drives `schedule` / `commit` for many steps with random arrivals,
//! prompt lengths (sharing prefixes), priorities, group sizes, output lengths and aborts, in
//! small pools that force preemption, with and without a background priority. It checks every step's plan against a fake backend that
//! stores each slot's token id (so wrong block tables, copies or prefix hits are caught), and
//! at the end that every sequence ended and every block came back.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice::kv_cache::CacheConfig;
use sluice::scheduler::{NewSequence, Scheduler, SchedulerConfig, SeqId, StepPlan};

const BLOCK_SIZE: usize = 4;

struct SimSeq {
    tokens: Vec<u32>,
    max_new_tokens: usize,
    num_generated: usize,
}

struct Sim {
    rng: ChaCha8Rng,
    sched: Scheduler,
    slots: Vec<Option<u32>>,
    seqs: HashMap<SeqId, SimSeq>,
    next_id: SeqId,
    num_ended: usize,
    num_too_long: usize,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let num_blocks = rng.random_range(12..48);
        let config = SchedulerConfig {
            max_num_batched_tokens: rng.random_range(8..64),
            max_num_seqs: rng.random_range(3..10),
            enable_chunked_prefill: rng.random_bool(0.8),
            max_prefill_chunk_tokens: rng.random_range(4..64),
            // Half the worlds make priority 1 background (yielding to, and preempted by,
            // the foreground's prefills): it must still finish once arrivals stop.
            background_priority: rng.random_bool(0.5).then_some(1),
        };
        let cache = CacheConfig {
            block_size: BLOCK_SIZE,
            num_blocks,
            enable_prefix_caching: rng.random_bool(0.8),
            sliding_window: None,
        };
        let sched = Scheduler::new(config, cache).unwrap_or_else(|e| panic!("{e}"));
        Self {
            rng,
            sched,
            slots: vec![None; num_blocks * BLOCK_SIZE],
            seqs: HashMap::new(),
            next_id: 0,
            num_ended: 0,
            num_too_long: 0,
        }
    }

    fn add_request(&mut self) {
        // Prompts start with one of three shared prefixes, so prefix hits happen.
        let prefix = self.rng.random_range(0..3u32);
        let len = self.rng.random_range(1..40);
        let prompt: Vec<u32> = (0..len)
            .map(|i| {
                if i < 24 {
                    prefix * 100 + i
                } else {
                    self.rng.random_range(0..5)
                }
            })
            .collect();
        let n = if self.rng.random_bool(0.3) {
            self.rng.random_range(2..4)
        } else {
            1
        };
        let ids: Vec<SeqId> = (self.next_id..self.next_id + n).collect();
        self.next_id += n;
        let seq = NewSequence {
            seq_id: ids[0],
            prompt_token_ids: prompt.clone(),
            priority: self.rng.random_range(-1..2),
            prefix_cache: true,
        };
        if self.sched.add_group(seq, &ids[1..]).is_err() {
            return; // too long or too large a group for this config: refused up front
        }
        for id in ids {
            let max_new_tokens = self.rng.random_range(1..24);
            let sim_seq = SimSeq {
                tokens: prompt.clone(),
                max_new_tokens,
                num_generated: 0,
            };
            self.seqs.insert(id, sim_seq);
        }
    }

    fn slot(table: &[u32], pos: usize) -> usize {
        table[pos / BLOCK_SIZE] as usize * BLOCK_SIZE + pos % BLOCK_SIZE
    }

    /// The fake runner: copy blocks, check the cached context, write the new tokens, sample.
    fn execute(&mut self, plan: &StepPlan) -> Vec<(SeqId, u32)> {
        let budget = self.sched.config().max_num_batched_tokens;
        assert!(plan.num_batched_tokens <= budget);
        assert!(plan.seqs.len() <= self.sched.config().max_num_seqs);
        for &(src, dst) in &plan.block_copies {
            for o in 0..BLOCK_SIZE {
                self.slots[dst as usize * BLOCK_SIZE + o] =
                    self.slots[src as usize * BLOCK_SIZE + o];
            }
        }
        let mut sampled = Vec::new();
        for e in &plan.seqs {
            let seq = &self.seqs[&e.seq_id];
            assert_eq!(e.token_ids, seq.tokens[e.start..e.end], "seq {}", e.seq_id);
            assert_eq!(e.sample, e.end == seq.tokens.len());
            for pos in 0..e.start {
                let got = self.slots[Self::slot(&e.block_table, pos)];
                assert_eq!(
                    got,
                    Some(seq.tokens[pos]),
                    "seq {} position {pos}",
                    e.seq_id
                );
            }
            for pos in e.start..e.end {
                self.slots[Self::slot(&e.block_table, pos)] = Some(seq.tokens[pos]);
            }
            if e.sample {
                sampled.push((e.seq_id, self.rng.random_range(0..5)));
            }
        }
        sampled
    }

    fn step(&mut self) {
        let plan = self.sched.schedule();
        let sampled = self.execute(&plan);
        self.sched
            .commit(&plan, &sampled)
            .unwrap_or_else(|e| panic!("{e}"));
        for &id in &plan.too_long_seq_ids {
            assert!(self.seqs.remove(&id).is_some());
            self.num_ended += 1;
            self.num_too_long += 1;
        }
        for (id, token) in sampled {
            let seq = self
                .seqs
                .get_mut(&id)
                .unwrap_or_else(|| panic!("unknown {id}"));
            seq.tokens.push(token);
            seq.num_generated += 1;
            assert_eq!(self.sched.token_ids(id), Some(&seq.tokens[..]));
            if seq.num_generated >= seq.max_new_tokens {
                assert!(self.sched.finish(id).is_some());
                self.seqs.remove(&id);
                self.num_ended += 1;
            }
        }
        if self.rng.random_bool(0.02) && !self.seqs.is_empty() {
            let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
            let id = ids[self.rng.random_range(0..ids.len())];
            let before = self.sched.kv_cache().num_free_blocks();
            assert!(self.sched.abort(id).is_some());
            assert!(self.sched.kv_cache().num_free_blocks() >= before);
            self.seqs.remove(&id);
            self.num_ended += 1;
        }
        self.sched
            .check_invariants()
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn random_workloads_finish_and_return_every_block() {
    let mut total_preemptions = 0;
    for seed in 0..200 {
        let mut sim = Sim::new(seed);
        let num_requests = 40;
        let mut num_added = 0;
        let mut steps = 0;
        while num_added < num_requests || sim.sched.has_unfinished() {
            if num_added < num_requests && sim.rng.random_bool(0.4) {
                sim.add_request();
                num_added += 1;
            }
            sim.step();
            steps += 1;
            assert!(
                steps < 20_000,
                "seed {seed}: no progress after {steps} steps"
            );
        }
        assert!(
            sim.seqs.is_empty(),
            "seed {seed}: {} sequences never ended",
            sim.seqs.len()
        );
        assert_eq!(sim.sched.num_running() + sim.sched.num_waiting(), 0);
        assert_eq!(
            sim.sched.kv_cache().num_free_blocks(),
            sim.sched.kv_cache().num_blocks(),
            "seed {seed}"
        );
        assert!(sim.num_ended > 0);
        total_preemptions += sim.sched.num_preemptions_total();
    }
    // The pools are small on purpose: preemption must have been exercised.
    assert!(total_preemptions > 0);
}
