//! `sluice generate`: one prompt, one continuation, printed as it is produced, with prefill
//! and decode speeds at the end. It runs through the engine, as the server does (the same
//! scheduler, runner, samplers and output stage: stop strings, EOS, detokenization), with one
//! sequence and a KV cache sized for it; the whole prompt is one prefill step.

use std::io::Write;
use std::time::Instant;

use serde::Serialize;

use super::model_args::{Loaded, ModelArgs, WithLoaded};
use crate::engine::{
    self, EngineConfig, EngineOptions, FinishReason, GenerateRequest, StopReason, StreamEvent,
};
use crate::kernels::Backend;
use crate::kv_cache::CacheConfig;
use crate::sampling::SamplingParams;
use crate::scheduler::SchedulerConfig;
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
    /// Text that ends the continuation (not printed); may be given several times.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Speculative decoding, as `serve`'s flag of the same name.
    #[arg(long, value_parser = super::engine_args::parse_speculative_config)]
    pub speculative_config: Option<crate::speculative::SpeculativeConfig>,
    /// A draft model for speculative decoding, as `serve`'s flag of the same name.
    #[arg(long)]
    pub speculative_model: Option<std::path::PathBuf>,
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
    let total = prompt_ids.len() + args.max_tokens;
    if total > max_len {
        anyhow::bail!(
            "prompt ({} tokens) + --max-tokens ({}) exceeds the model's context of {max_len} tokens",
            prompt_ids.len(),
            args.max_tokens
        );
    }
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_seqs: 1,
            // The whole prompt in one step: its time is the prefill's.
            max_num_batched_tokens: prompt_ids
                .len()
                .max(SchedulerConfig::default().max_num_batched_tokens),
            enable_chunked_prefill: false,
            ..SchedulerConfig::default()
        },
        cache: CacheConfig {
            block_size: BLOCK_SIZE,
            num_blocks: total.div_ceil(BLOCK_SIZE),
            enable_prefix_caching: false,
            // The engine's, from its model.
            sliding_window: None,
        },
        max_model_len: max_len,
        max_waiting: 0,
        speculative: super::engine_args::speculative_with_model(
            args.speculative_config.as_ref(),
            args.speculative_model.as_deref(),
        )?,
        ..EngineConfig::default()
    };
    let engine = engine::spawn_with(loaded.model, tok.clone(), config, EngineOptions::default())?;
    let request = GenerateRequest {
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..SamplingParams::default()
        },
        ignore_eos: args.ignore_eos,
        stop: args.stop.clone(),
        ..GenerateRequest::greedy(prompt_ids.clone(), args.max_tokens)
    };
    let started = Instant::now();
    let mut stream = engine.submit(request)?;
    let mut stdout = std::io::stdout().lock();
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut first_token_at = None;
    loop {
        match stream.next_blocking() {
            Some(StreamEvent::Token {
                text: delta,
                token_ids,
                ..
            }) => {
                first_token_at.get_or_insert_with(Instant::now);
                ids.extend(token_ids);
                if !args.json {
                    write!(stdout, "{delta}")?;
                    stdout.flush()?;
                }
                text.push_str(&delta);
            }
            Some(StreamEvent::SeqFinished {
                reason: FinishReason::Stop,
                stop_reason,
                ..
            }) if !matches!(stop_reason, Some(StopReason::Text(_))) => {
                // The EOS or stop token that ended it is not part of the continuation.
                ids.pop();
            }
            Some(StreamEvent::SeqFinished { .. } | StreamEvent::Embedding { .. }) => {}
            Some(StreamEvent::Done { .. }) => break,
            Some(StreamEvent::Error(e)) => anyhow::bail!("generation failed: {e}"),
            None => anyhow::bail!("the engine stopped before the request ended"),
        }
    }
    let ended = Instant::now();
    // The first generated token comes from the prefill step; the others from decode steps.
    let first = first_token_at.unwrap_or(ended);
    let prefill_secs = (first - started).as_secs_f64();
    let decode_secs = (ended - first).as_secs_f64();
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
        writeln!(stdout)?;
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
