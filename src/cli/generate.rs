//! `sluice generate`: one prompt, one continuation, printed as it is produced, with prefill
//! and decode speeds at the end.

use std::io::Write;
use std::time::Instant;

use serde::Serialize;

use super::model_args::{Loaded, ModelArgs, WithLoaded};
use crate::kernels::{Backend, BatchSeq, ForwardBatch};
use crate::model::rank_group::RankGroup;
use crate::model::sampling::{SamplingParams, SamplingScratch, SequenceSampler};
use crate::tokenizer::detokenize::IncrementalDetokenizer;
use crate::tokenizer::{ChatMessage, ChatTemplateOptions};

const BLOCK_SIZE: usize = 16;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct GenerateOutput {
    prompt_ids: Vec<u32>,
    ids: Vec<u32>,
    text: String,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    args.model.clone().load_and(Generate(args))
}

/// `generate` on whichever backend the device selected.
struct Generate(GenerateArgs);

impl WithLoaded for Generate {
    type Output = ();
    fn run<B: Backend>(self, loaded: Loaded<B>) -> anyhow::Result<()> {
        generate(self.0, loaded)
    }
}

fn generate<B: Backend>(args: GenerateArgs, loaded: Loaded<B>) -> anyhow::Result<()> {
    let tok = loaded.tokenizer.clone();
    let prompt = if args.chat {
        tok.apply_chat_template(
            &[ChatMessage::new("user", args.prompt.clone())],
            &ChatTemplateOptions {
                add_generation_prompt: true,
                ..Default::default()
            },
        )?
    } else {
        args.prompt.clone()
    };
    let prompt_ids = tok.encode(&prompt, true)?;
    if prompt_ids.is_empty() {
        anyhow::bail!("the prompt is empty after tokenization");
    }
    let max_len = loaded.model.config.max_position_embeddings;
    if prompt_ids.len() + args.max_tokens > max_len {
        anyhow::bail!(
            "prompt ({} tokens) + --max-tokens ({}) exceeds the model's context of {max_len} tokens",
            prompt_ids.len(),
            args.max_tokens
        );
    }
    let total = prompt_ids.len() + args.max_tokens;
    let num_blocks = total.div_ceil(BLOCK_SIZE);
    let mut model = RankGroup::start(loaded.model, num_blocks, BLOCK_SIZE)?;
    let block_table: Vec<u32> = (0..num_blocks as u32).collect();
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        ..SamplingParams::default()
    };
    let mut sampler = SequenceSampler::new(params, &prompt_ids, 0);
    let mut scratch = SamplingScratch::default();
    let mut detok = IncrementalDetokenizer::new(&tok, true);
    let mut stdout = std::io::stdout().lock();

    let mut ids = Vec::new();
    let mut text = String::new();
    let mut pending = prompt_ids.clone();
    let mut done = 0usize;
    let mut prefill_secs = 0.0;
    let mut decode_started = None;
    while ids.len() < args.max_tokens {
        let n = pending.len();
        let batch = ForwardBatch {
            token_ids: std::mem::take(&mut pending),
            positions: (done as u32..(done + n) as u32).collect(),
            slot_mapping: (done as u32..(done + n) as u32).collect(),
            seqs: vec![BatchSeq {
                query_start: 0,
                query_len: n,
                context_len: done + n,
                block_table: block_table.clone(),
                prompt_len: prompt_ids.len(),
            }],
            logits_rows: vec![n as u32 - 1],
        };
        let t = Instant::now();
        let mut logits = model.run(&batch, &[])?;
        let next = sampler.sample(&mut logits, &mut scratch).token_id;
        if done == 0 {
            prefill_secs = t.elapsed().as_secs_f64();
            decode_started = Some(Instant::now());
        }
        done += n;
        if !args.ignore_eos && tok.is_eos(next) {
            break;
        }
        ids.push(next);
        let delta = detok.push(&tok, next)?;
        if !args.json {
            write!(stdout, "{delta}")?;
            stdout.flush()?;
        }
        text.push_str(&delta);
        pending = vec![next];
    }
    let rest = detok.flush(&tok)?;
    text.push_str(&rest);
    // The first generated token comes from the prefill; the others from decode steps.
    let decode_secs = decode_started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let decoded = ids.len().saturating_sub(1);
    let out = GenerateOutput {
        prefill_tokens_per_s: prompt_ids.len() as f64 / prefill_secs.max(1e-9),
        decode_tokens_per_s: if decoded > 0 {
            decoded as f64 / decode_secs.max(1e-9)
        } else {
            0.0
        },
        prompt_ids,
        ids,
        text,
    };
    if args.json {
        serde_json::to_writer(&mut stdout, &out)?;
        writeln!(stdout)?;
    } else {
        writeln!(stdout, "{rest}")?;
        eprintln!(
            "\nprefill: {} tokens, {:.1} tokens/s | decode: {} tokens, {:.1} tokens/s",
            out.prompt_ids.len(),
            out.prefill_tokens_per_s,
            decoded,
            out.decode_tokens_per_s
        );
    }
    Ok(())
}
