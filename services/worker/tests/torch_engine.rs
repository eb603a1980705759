//! The torch engine against Hugging Face `transformers` on the project's tiny Llama: logits
//! parity, greedy continuations, exact prefix reuse, batched vs single decode, sharded
//! checkpoints and loading errors; and on real weights (SmolLM2-135M-Instruct): greedy tokens
//! batched, a cached prefix and chunked prefill.
//!
//! Needs `make tiny-model` and `make real-model` (the models) and the torch virtualenv (the
//! reference); `make test-torch` provides them. Missing any fails the tests loudly.
#![cfg(feature = "torch")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use preble_costmodel::Profile;
use preble_tests::{tiny_model_dir, torch_venv};
use preble_worker::engine::llama_config::ModelError;
use preble_worker::engine::sampling::argmax;
use preble_worker::engine::torch::model::{LogitsOf, SeqInput};
use preble_worker::engine::torch::{TorchEngine, TorchOptions};
use tch::Tensor;

/// Logits of our engine and of transformers agree this closely in f32.
const LOGIT_TOLERANCE: f32 = 1e-4;

fn torch_python() -> PathBuf {
    let python = torch_venv().join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make torch-env` (make test-torch does)",
        python.display()
    );
    python
}

/// The device the tests run on: `PREBLE_TEST_DEVICE` (`scripts/gpu-check.sh` sets `cuda`),
/// default `cpu`.
fn device() -> String {
    std::env::var("PREBLE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

fn options(capacity: u64) -> TorchOptions {
    TorchOptions {
        device: device(),
        dtype: Some("f32".into()),
        kv_capacity_tokens: Some(capacity),
        kv_memory_fraction: None,
        profile: Profile::a6000_mistral_7b(),
    }
}

fn load(dir: &Path) -> TorchEngine {
    load_with(dir, 8192)
}

fn load_with(dir: &Path, capacity: u64) -> TorchEngine {
    TorchEngine::load(dir, &options(capacity)).expect("the model loads")
}

/// Prompts of different lengths with token ids spread over the vocabulary (seeded).
fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    [7usize, 19, 33, 64]
        .iter()
        .enumerate()
        .map(|(p, &len)| {
            (0..len)
                .map(|i| (preble_prefix::mix64((p * 1000 + i) as u64) % u64::from(vocab)) as u32)
                .collect()
        })
        .collect()
}

struct Reference {
    logits: Vec<Vec<Vec<f32>>>,
    greedy: Vec<Vec<u32>>,
}

/// Runs `scripts/torch_reference.py` on `prompts` (every position's logits).
fn reference(dir: &Path, prompts: &[Vec<u32>]) -> Reference {
    reference_with(dir, prompts, &[])
}

/// Runs `scripts/torch_reference.py` on `prompts` with extra flags.
fn reference_with(dir: &Path, prompts: &[Vec<u32>], flags: &[&str]) -> Reference {
    let work = tempfile::tempdir().unwrap();
    let prompts_path = work.path().join("prompts.json");
    std::fs::write(&prompts_path, serde_json::to_string(prompts).unwrap()).unwrap();
    let out = work.path().join("reference.safetensors");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/torch_reference.py");
    let status = Command::new(torch_python())
        .arg(script)
        .arg(dir)
        .arg(&prompts_path)
        .arg(&out)
        .args(flags)
        .status()
        .expect("running the reference script");
    assert!(status.success(), "the reference script failed");
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();
    let logits = (0..prompts.len())
        .map(|i| {
            let t = &tensors[&format!("logits.{i}")];
            Vec::<Vec<f32>>::try_from(t).unwrap()
        })
        .collect();
    let greedy = (0..prompts.len())
        .map(|i| {
            let t = &tensors[&format!("greedy.{i}")];
            Vec::<i64>::try_from(t)
                .unwrap()
                .into_iter()
                .map(|id| id as u32)
                .collect()
        })
        .collect();
    Reference { logits, greedy }
}

/// Contiguous slot ranges, one per prompt, from `base`.
fn slot_ranges(lens: &[usize], base: u32, room: u32) -> Vec<Vec<u32>> {
    lens.iter()
        .enumerate()
        .map(|(i, &len)| {
            (0..len as u32)
                .map(|j| base + i as u32 * room + j)
                .collect()
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every prompt computed in one forward pass, prompt `i` in slots from `i * room`.
fn prefill_together(
    engine: &mut TorchEngine,
    prompts: &[Vec<u32>],
    room: u32,
    of: LogitsOf,
) -> Vec<Vec<f32>> {
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let slots = slot_ranges(&lens, 0, room);
    let seqs: Vec<SeqInput<'_>> = prompts
        .iter()
        .zip(&slots)
        .map(|(p, s)| SeqInput {
            tokens: p,
            start: 0,
            slots: s,
        })
        .collect();
    engine
        .logits(&seqs, &vec![true; prompts.len()], of)
        .unwrap()
}

/// Slots each prompt gets in [`greedy_batched`]: its length plus the steps, at least 256.
fn slot_room(prompts: &[Vec<u32>], steps: usize) -> u32 {
    (prompts.iter().map(Vec::len).max().unwrap_or(0) + steps).max(256) as u32
}

/// Greedy continuation of every prompt, all decoded together in each step.
fn greedy_batched(engine: &mut TorchEngine, prompts: &[Vec<u32>], steps: usize) -> Vec<Vec<u32>> {
    let room = slot_room(prompts, steps);
    let mut tokens: Vec<Vec<u32>> = prompts.to_vec();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut slots = slot_ranges(&lens, 0, room);
    let mut out = vec![Vec::new(); prompts.len()];
    let mut computed: Vec<usize> = vec![0; prompts.len()];
    for _ in 0..steps {
        let seqs: Vec<SeqInput<'_>> = (0..prompts.len())
            .map(|i| SeqInput {
                tokens: &tokens[i][computed[i]..],
                start: computed[i],
                slots: &slots[i],
            })
            .collect();
        let rows = engine
            .logits(&seqs, &vec![true; prompts.len()], LogitsOf::Last)
            .unwrap();
        for (i, row) in rows.iter().enumerate() {
            let next = argmax(row);
            computed[i] = tokens[i].len();
            tokens[i].push(next);
            slots[i].push(i as u32 * room + tokens[i].len() as u32 - 1);
            out[i].push(next);
        }
    }
    out
}

#[test]
fn logits_and_greedy_continuations_match_transformers() {
    let dir = tiny_model_dir();
    let mut engine = load(&dir);
    let vocab = engine.model().config().vocab_size as u32;
    let prompts = prompts(vocab);
    let reference = reference(&dir, &prompts);

    // All prompts in one forward pass, every position's logits.
    let rows = prefill_together(&mut engine, &prompts, 256, LogitsOf::All);
    let mut row = 0;
    for (i, prompt) in prompts.iter().enumerate() {
        for position in 0..prompt.len() {
            let diff = max_abs_diff(&rows[row], &reference.logits[i][position]);
            assert!(
                diff < LOGIT_TOLERANCE,
                "prompt {i} position {position}: logits differ by {diff}"
            );
            row += 1;
        }
    }

    let mut fresh = load(&dir);
    let greedy = greedy_batched(&mut fresh, &prompts, 32);
    assert_eq!(greedy, reference.greedy, "greedy continuations differ");
}

#[test]
fn a_cached_prefix_gives_the_same_output_and_is_not_recomputed() {
    let dir = tiny_model_dir();
    let prompt: Vec<u32> = (0..80u32).map(|i| (i * 37 + 11) % 500).collect();
    let cached = 64;

    // Cold: the whole prompt at once.
    let mut cold = load(&dir);
    let slots: Vec<u32> = (0..prompt.len() as u32).collect();
    let cold_logits = cold
        .logits(
            &[SeqInput {
                tokens: &prompt,
                start: 0,
                slots: &slots,
            }],
            &[true],
            LogitsOf::Last,
        )
        .unwrap();
    let cold_greedy = greedy_batched(&mut load(&dir), std::slice::from_ref(&prompt), 16);

    // Warm: another request computed the first 64 tokens into slots 1000..1064; this one
    // reuses those slots and computes only the rest.
    let mut warm = load(&dir);
    let first_slots: Vec<u32> = (1000..1000 + cached as u32).collect();
    warm.logits(
        &[SeqInput {
            tokens: &prompt[..cached],
            start: 0,
            slots: &first_slots,
        }],
        &[false],
        LogitsOf::Last,
    )
    .unwrap();
    let before = warm.computed_tokens();
    let mut reuse_slots = first_slots.clone();
    reuse_slots.extend(3000..3000 + (prompt.len() - cached) as u32);
    let warm_logits = warm
        .logits(
            &[SeqInput {
                tokens: &prompt[cached..],
                start: cached,
                slots: &reuse_slots,
            }],
            &[true],
            LogitsOf::Last,
        )
        .unwrap();
    assert_eq!(
        warm.computed_tokens() - before,
        (prompt.len() - cached) as u64,
        "only the missed tokens are computed"
    );
    let diff = max_abs_diff(&cold_logits[0], &warm_logits[0]);
    assert!(diff < 1e-5, "cached-prefix logits differ by {diff}");

    // And the continuation from the reused prefix is token for token the cold one.
    let mut tokens = prompt.clone();
    let mut slots = reuse_slots;
    let mut next = argmax(&warm_logits[0]);
    let mut warm_greedy = vec![next];
    for step in 1..16 {
        tokens.push(next);
        slots.push(5000 + step);
        let rows = warm
            .logits(
                &[SeqInput {
                    tokens: &tokens[tokens.len() - 1..],
                    start: tokens.len() - 1,
                    slots: &slots,
                }],
                &[true],
                LogitsOf::Last,
            )
            .unwrap();
        next = argmax(&rows[0]);
        warm_greedy.push(next);
    }
    assert_eq!(warm_greedy, cold_greedy[0]);
}

#[test]
fn batched_decode_equals_one_at_a_time() {
    let dir = tiny_model_dir();
    let prompts = prompts(500);
    let together = greedy_batched(&mut load(&dir), &prompts, 12);
    for (i, prompt) in prompts.iter().enumerate() {
        let alone = greedy_batched(&mut load(&dir), std::slice::from_ref(prompt), 12);
        assert_eq!(alone[0], together[i], "prompt {i}");
    }
}

/// A copy of the tiny model's directory to break in a test.
fn copy_model(dir: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    copy
}

/// A checkpoint's tensors by name, as `Tensor::read_safetensors` gives them.
type NamedTensors = Vec<(String, Tensor)>;

fn load_error(dir: &Path, options: &TorchOptions) -> ModelError {
    match TorchEngine::load(dir, options) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn a_sharded_checkpoint_loads_to_the_same_model() {
    let dir = tiny_model_dir();
    let sharded = copy_model(&dir);
    let tensors = Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
    std::fs::remove_file(sharded.path().join("model.safetensors")).unwrap();
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        Tensor::write_safetensors(part, sharded.path().join(file)).unwrap();
        for (name, _) in part {
            weight_map.insert(name.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let prompt: Vec<u32> = (1..30).collect();
    let slots: Vec<u32> = (0..29).collect();
    let seq = [SeqInput {
        tokens: &prompt,
        start: 0,
        slots: &slots,
    }];
    let a = load(&dir).logits(&seq, &[true], LogitsOf::Last).unwrap();
    let b = load(sharded.path())
        .logits(&seq, &[true], LogitsOf::Last)
        .unwrap();
    assert_eq!(a, b);

    // A shard the index names but the directory lacks is an error naming it.
    std::fs::remove_file(sharded.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_error(sharded.path(), &options(1024));
    assert!(e.to_string().contains("model-00002-of-00002"), "{e}");
}

#[test]
fn loading_errors_are_clear() {
    let dir = tiny_model_dir();

    let no_weights = copy_model(&dir);
    std::fs::remove_file(no_weights.path().join("model.safetensors")).unwrap();
    let e = load_error(no_weights.path(), &options(1024));
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    let tensors = Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
    let rewrite = |edit: &dyn Fn(&mut NamedTensors)| {
        let copy = copy_model(&dir);
        let mut tensors: NamedTensors = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        edit(&mut tensors);
        Tensor::write_safetensors(&tensors, copy.path().join("model.safetensors")).unwrap();
        copy
    };
    let missing = rewrite(&|t| t.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight"));
    let e = load_error(missing.path(), &options(1024));
    assert!(
        matches!(&e, ModelError::MissingTensor(n) if n == "model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );
    let misshaped = rewrite(&|t| {
        for (name, tensor) in t.iter_mut() {
            if name == "model.layers.0.self_attn.k_proj.weight" {
                *tensor = Tensor::zeros([3, 64], (tch::Kind::Float, tch::Device::Cpu));
            }
        }
    });
    let e = load_error(misshaped.path(), &options(1024));
    assert!(
        e.to_string()
            .contains("model.layers.0.self_attn.k_proj.weight")
            && e.to_string().contains("[3, 64]"),
        "{e}"
    );

    let other_arch = copy_model(&dir);
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        other_arch.path().join("config.json"),
        config.replace("LlamaForCausalLM", "Qwen2MoeForCausalLM"),
    )
    .unwrap();
    let e = load_error(other_arch.path(), &options(1024));
    assert!(e.to_string().contains("unsupported architecture"), "{e}");

    let mut f16_on_cpu = options(1024);
    f16_on_cpu.device = "cpu".into();
    f16_on_cpu.dtype = Some("f16".into());
    assert!(load_error(&dir, &f16_on_cpu).to_string().contains("f16"));
    let mut no_such_gpu = options(1024);
    no_such_gpu.device = "cuda:99".into();
    assert!(
        load_error(&dir, &no_such_gpu)
            .to_string()
            .contains("cuda:99")
    );
    let mut nonsense = options(1024);
    nonsense.device = "tpu".into();
    assert!(load_error(&dir, &nonsense).to_string().contains("tpu"));
}

/// Logits on real weights agree with transformers this closely in f32 (30 layers of
/// accumulated rounding; the largest difference is printed).
const REAL_LOGIT_TOLERANCE: f32 = 5e-4;

/// Prompts of these lengths of ordinary text tokens of the real model (ids past the special
/// ones), seeded.
fn text_prompts(lens: &[usize]) -> Vec<Vec<u32>> {
    lens.iter()
        .enumerate()
        .map(|(p, &len)| {
            (0..len)
                .map(|i| 100 + (preble_prefix::mix64((p * 100_000 + i) as u64) % 20_000) as u32)
                .collect()
        })
        .collect()
}

/// The last position's logits of `prompt`, prefilled in chunks of `chunk` tokens, after the
/// first `cached` tokens were computed by another sequence into the same slots.
fn last_logits_chunked(
    engine: &mut TorchEngine,
    prompt: &[u32],
    cached: usize,
    chunk: usize,
) -> Vec<f32> {
    let slots: Vec<u32> = (0..prompt.len() as u32).collect();
    if cached > 0 {
        engine
            .logits(
                &[SeqInput {
                    tokens: &prompt[..cached],
                    start: 0,
                    slots: &slots[..cached],
                }],
                &[false],
                LogitsOf::Last,
            )
            .unwrap();
    }
    let mut start = cached;
    let mut last = Vec::new();
    while start < prompt.len() {
        let end = (start + chunk).min(prompt.len());
        let rows = engine
            .logits(
                &[SeqInput {
                    tokens: &prompt[start..end],
                    start,
                    slots: &slots[..end],
                }],
                &[end == prompt.len()],
                LogitsOf::Last,
            )
            .unwrap();
        if end == prompt.len() {
            last = rows.into_iter().next().unwrap();
        }
        start = end;
    }
    last
}

#[test]
fn real_weights_match_transformers_batched_cached_and_chunked() {
    let dir = preble_tests::real_model_dir();
    let lens = [5usize, 17, 40, 96, 150, 300, 700, 2000];
    let prompts = text_prompts(&lens);
    let reference = reference_with(&dir, &prompts, &["--last-logits"]);
    let steps = 32;
    let capacity = u64::from(slot_room(&prompts, steps)) * prompts.len() as u64;

    // Every prompt prefilled in one batch: the last position's logits.
    let rows = prefill_together(
        &mut load_with(&dir, capacity),
        &prompts,
        slot_room(&prompts, steps),
        LogitsOf::Last,
    );
    let mut largest = 0.0f32;
    for (i, row) in rows.iter().enumerate() {
        let diff = max_abs_diff(row, &reference.logits[i][0]);
        largest = largest.max(diff);
        assert!(
            diff < REAL_LOGIT_TOLERANCE,
            "prompt {i} ({} tokens): logits differ by {diff}",
            lens[i]
        );
    }
    eprintln!("largest logit difference from transformers, f32: {largest:e}");

    // Greedy, all eight decoded together, token for token transformers' (each alone).
    let greedy = greedy_batched(&mut load_with(&dir, capacity), &prompts, steps);
    for (i, (ours, theirs)) in greedy.iter().zip(&reference.greedy).enumerate() {
        assert_eq!(
            ours, theirs,
            "prompt {i} ({} tokens): greedy tokens differ",
            lens[i]
        );
    }

    // The 2,000-token prompt in 512-token chunks, and with its first 1,500 tokens cached.
    let long = &prompts[7];
    for (cached, chunk) in [(0, 512), (1500, 256)] {
        let last = last_logits_chunked(&mut load_with(&dir, 4096), long, cached, chunk);
        let diff = max_abs_diff(&last, &reference.logits[7][0]);
        assert!(
            diff < REAL_LOGIT_TOLERANCE,
            "cached {cached}, chunks of {chunk}: logits differ by {diff}"
        );
        assert_eq!(argmax(&last), reference.greedy[7][0]);
    }
}

/// bf16 rounds every operation's result to 8 bits of mantissa, so two bf16 implementations
/// summing in different orders part after a few near-ties. The bar: our bf16 logits are no
/// further from the f32 truth than this multiple of transformers' own bf16 logits are, and
/// the greedy tokens equal transformers' bf16 ones for at least the first
/// [`BF16_AGREEING_TOKENS`] of every prompt.
const BF16_DISTANCE_RATIO: f32 = 2.0;

/// Greedy tokens that must agree with transformers' in bf16 (of 16 generated).
const BF16_AGREEING_TOKENS: usize = 8;

#[test]
fn real_weights_in_bf16_are_as_close_to_f32_as_transformers_bf16() {
    let dir = preble_tests::real_model_dir();
    let lens = [5usize, 17, 40, 96, 150, 300];
    let prompts = text_prompts(&lens);
    let steps = 16;
    let flags = |dtype| ["--last-logits", "--dtype", dtype, "--greedy-tokens", "16"];
    let truth = reference_with(&dir, &prompts, &flags("f32"));
    let theirs = reference_with(&dir, &prompts, &flags("bf16"));
    let capacity = u64::from(slot_room(&prompts, steps)) * prompts.len() as u64;
    let bf16 = || {
        let mut o = options(capacity);
        o.dtype = Some("bf16".into());
        TorchEngine::load(&dir, &o).expect("the model loads in bf16")
    };
    let rows = prefill_together(
        &mut bf16(),
        &prompts,
        slot_room(&prompts, steps),
        LogitsOf::Last,
    );
    let distance = |rows: &mut dyn Iterator<Item = &Vec<f32>>| {
        rows.zip(&truth.logits)
            .map(|(row, t)| max_abs_diff(row, &t[0]))
            .fold(0.0f32, f32::max)
    };
    let ours_from_f32 = distance(&mut rows.iter());
    let theirs_from_f32 = distance(&mut theirs.logits.iter().map(|l| &l[0]));
    let rms = |rows: &mut dyn Iterator<Item = &Vec<f32>>| {
        let (sum, n) = rows
            .zip(&truth.logits)
            .flat_map(|(row, t)| row.iter().zip(&t[0]).map(|(a, b)| f64::from(a - b).powi(2)))
            .fold((0.0, 0usize), |(s, n), d| (s + d, n + 1));
        (sum / n.max(1) as f64).sqrt()
    };
    let (ours_rms, theirs_rms) = (
        rms(&mut rows.iter()),
        rms(&mut theirs.logits.iter().map(|l| &l[0])),
    );
    let ours_from_theirs = rows
        .iter()
        .zip(&theirs.logits)
        .map(|(row, t)| max_abs_diff(row, &t[0]))
        .fold(0.0f32, f32::max);
    let greedy = greedy_batched(&mut bf16(), &prompts, steps);
    let agreeing: Vec<usize> = greedy
        .iter()
        .zip(&theirs.greedy)
        .map(|(ours, theirs)| ours.iter().zip(theirs).take_while(|(a, b)| a == b).count())
        .collect();
    eprintln!(
        "bf16 logits, largest (root mean square) difference: ours from f32 {ours_from_f32:e} \
         ({ours_rms:.3}), transformers' bf16 from f32 {theirs_from_f32:e} ({theirs_rms:.3}), ours \
         from transformers' bf16 {ours_from_theirs:e}; greedy tokens equal to transformers' bf16 \
         before the first difference, of {steps}: {agreeing:?}"
    );
    assert!(
        ours_from_f32 <= BF16_DISTANCE_RATIO * theirs_from_f32,
        "our bf16 is {ours_from_f32} from f32, transformers' bf16 {theirs_from_f32}"
    );
    for (i, agree) in agreeing.iter().enumerate() {
        assert!(
            *agree >= BF16_AGREEING_TOKENS,
            "prompt {i} ({} tokens): bf16 greedy tokens part after {agree}",
            lens[i]
        );
    }
}
