//! The torch engine against Hugging Face `transformers` `generate` on the same weights, in
//! one run: decode throughput at batch 1 and at batch 16 (continuous batching through the
//! worker's own local scheduler), and the time to first token of a 2,048-token prompt whose
//! first 1,920 tokens are cached vs cold.
//!
//! `make bench-torch` runs it (it makes the ~100M-parameter model and the virtualenv first).
//! Environment: `PREBLE_BENCH_MODEL_DIR` (default `models/bench-100m`), `PREBLE_TORCH_VENV`,
//! `PREBLE_BENCH_DEVICE` (default `cpu`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use preble_costmodel::Profile;
use preble_localsched::{LocalScheduler, SchedulerConfig, WaitOrder};
use preble_protocol::SamplingParams;
use preble_worker::engine::torch::{TorchEngine, TorchOptions};
use preble_worker::engine::{Engine, RequestView, step_batch};
use serde_json::Value;

const PROMPT_LEN: usize = 128;
const NEW_TOKENS: u32 = 128;
const BATCH: usize = 16;
const LONG_PROMPT: usize = 2048;
const CACHED_PREFIX: usize = 1920;

struct Request {
    id: usize,
    sampling: SamplingParams,
}

/// What serving a set of requests took.
struct Served {
    elapsed: Duration,
    generated: u64,
    first_token: HashMap<usize, Duration>,
}

/// Serves `prompts` to completion through a local scheduler over `engine`, as the worker does.
fn serve(
    engine: &mut TorchEngine,
    sched: &mut LocalScheduler<Request>,
    prompts: &[Vec<u32>],
    max_tokens: u32,
) -> Served {
    let sampling = SamplingParams {
        max_tokens,
        temperature: 0.0,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let started = Instant::now();
    for (id, prompt) in prompts.iter().enumerate() {
        let request = Request {
            id,
            sampling: sampling.clone(),
        };
        sched
            .enqueue(request, prompt.clone(), max_tokens)
            .expect("the request fits");
    }
    let mut first_token = HashMap::new();
    let mut generated = 0;
    while !sched.is_idle() {
        let plan = sched.plan();
        let steps = step_batch(sched, &plan, |r: &Request| RequestView {
            prompt_hash: r.id as u64,
            sampling: &r.sampling,
            seed: 0,
            output_offset: 0,
        });
        let output = engine.step(&steps).expect("the step runs");
        drop(steps);
        let mut done = Vec::new();
        for (index, _) in sched.commit(&plan, &output.tokens) {
            generated += 1;
            let seq = &sched.running()[index];
            first_token
                .entry(seq.payload.id)
                .or_insert_with(|| started.elapsed());
            if seq.generated().len() as u32 >= max_tokens {
                done.push(index);
            }
        }
        done.sort_unstable_by(|a, b| b.cmp(a));
        for index in done {
            sched.finish(index);
        }
    }
    Served {
        elapsed: started.elapsed(),
        generated,
        first_token,
    }
}

fn scheduler() -> LocalScheduler<Request> {
    LocalScheduler::new(SchedulerConfig {
        kv_capacity: 16_384,
        prefill_budget: 512,
        max_running: 64,
        priority_groups: 10,
        decode_reserve: 0.25,
        wait_order: WaitOrder::Priority,
    })
}

fn random_prompt(seed: u64, len: usize, vocab: u64) -> Vec<u32> {
    (0..len as u64)
        .map(|i| (preble_prefix::mix64(seed * 1_000_003 + i) % (vocab - 4) + 4) as u32)
        .collect()
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model_dir = std::env::var_os("PREBLE_BENCH_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models/bench-100m"));
    assert!(
        model_dir.join("model.safetensors").exists(),
        "{} has no model: run `make bench-model`",
        model_dir.display()
    );
    let venv = preble_tests::torch_venv();
    let device = std::env::var("PREBLE_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());

    eprintln!("transformers baseline on {} ...", model_dir.display());
    let output = Command::new(venv.join("bin/python"))
        .arg(root.join("scripts/torch_bench_hf.py"))
        .arg(&model_dir)
        .args(["--prompt-len", &PROMPT_LEN.to_string()])
        .args(["--new-tokens", &NEW_TOKENS.to_string()])
        .args(["--batch", &BATCH.to_string()])
        .args(["--long-prompt", &LONG_PROMPT.to_string()])
        .args(["--device", &device])
        .output()
        .expect("running the transformers baseline");
    assert!(
        output.status.success(),
        "transformers baseline failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let hf: Value = serde_json::from_slice(&output.stdout).expect("baseline JSON");
    let hf_rate = |key: &str| hf[key].as_f64().expect("baseline number");

    let options = TorchOptions {
        device: device.clone(),
        dtype: Some("f32".into()),
        kv_capacity_tokens: Some(16_384),
        kv_memory_fraction: None,
        profile: Profile::a6000_mistral_7b(),
    };
    let mut engine = TorchEngine::load(&model_dir, &options).expect("the model loads");
    let vocab = engine.model().config().vocab_size as u64;
    eprintln!("preble torch engine ({device}) ...");

    // Warm-up, then batch 1.
    serve(
        &mut engine,
        &mut scheduler(),
        &[random_prompt(99, PROMPT_LEN, vocab)],
        16,
    );
    let one = serve(
        &mut engine,
        &mut scheduler(),
        &[random_prompt(1, PROMPT_LEN, vocab)],
        NEW_TOKENS,
    );
    let prompts: Vec<Vec<u32>> = (0..BATCH as u64)
        .map(|i| random_prompt(100 + i, PROMPT_LEN, vocab))
        .collect();
    let batched = serve(&mut engine, &mut scheduler(), &prompts, NEW_TOKENS);

    // Time to first token of a long prompt: cold, then with its first 1,920 tokens cached
    // by an earlier request.
    let long = random_prompt(7, LONG_PROMPT, vocab);
    let cold = serve(
        &mut engine,
        &mut scheduler(),
        std::slice::from_ref(&long),
        1,
    );
    let mut warm_sched = scheduler();
    serve(
        &mut engine,
        &mut warm_sched,
        &[long[..CACHED_PREFIX].to_vec()],
        1,
    );
    let warm = serve(&mut engine, &mut warm_sched, std::slice::from_ref(&long), 1);

    let rate = |s: &Served| s.generated as f64 / s.elapsed.as_secs_f64();
    let (ours_one, ours_batched) = (rate(&one), rate(&batched));
    let (hf_one, hf_batched) = (
        hf_rate("batch1_tokens_per_s"),
        hf_rate("batched_tokens_per_s"),
    );
    let cold_ttft = cold.first_token[&0].as_secs_f64();
    let warm_ttft = warm.first_token[&0].as_secs_f64();
    let hf_ttft = hf_rate("long_prompt_ttft_s");
    println!(
        "torch engine vs transformers, {} f32 on {device}, {} threads; prompts {PROMPT_LEN}, {NEW_TOKENS} new tokens, greedy",
        model_dir.file_name().unwrap_or_default().to_string_lossy(),
        hf["threads"]
    );
    println!("| measure | preble | transformers | ratio | floor |");
    println!("|---|---|---|---|---|");
    println!(
        "| decode tokens/s, batch 1 | {ours_one:.1} | {hf_one:.1} | {:.2}x | >= 1.0x |",
        ours_one / hf_one
    );
    println!(
        "| decode tokens/s, batch {BATCH} (continuous batching) | {ours_batched:.1} | {hf_batched:.1} (batch {BATCH}) | {:.2}x of transformers batch 1 | >= 2x |",
        ours_batched / hf_one
    );
    println!(
        "| TTFT {LONG_PROMPT}-token prompt, cold | {cold_ttft:.3} s | {hf_ttft:.3} s | {:.2}x | |",
        hf_ttft / cold_ttft
    );
    println!(
        "| TTFT {LONG_PROMPT}-token prompt, {CACHED_PREFIX} cached | {warm_ttft:.3} s | | {:.1}x lower than cold | >= 5x |",
        cold_ttft / warm_ttft
    );
}
