#!/usr/bin/env python3
"""Hugging Face `transformers` baseline for the torch engine's benchmark (same weights, f32,
CPU): decode throughput of `generate` at batch 1 and batch B, and the time to first token of
a long prompt. Prints one JSON object."""
import argparse
import json
import pathlib
import time

import torch
from transformers import LlamaForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=pathlib.Path)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--long-prompt", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).to(device).eval()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def generate_rate(batch):
        ids = torch.randint(4, vocab, (batch, args.prompt_len), generator=generator).to(device)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 pad_token_id=0)
        sync()
        elapsed = time.perf_counter() - start
        generated = (out.shape[1] - args.prompt_len) * batch
        return generated / elapsed

    generate_rate(1)  # warm-up
    batch1 = generate_rate(1)
    batched = generate_rate(args.batch)
    long_ids = torch.randint(4, vocab, (1, args.long_prompt), generator=generator).to(device)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(long_ids, attention_mask=torch.ones_like(long_ids), do_sample=False,
                       max_new_tokens=1, pad_token_id=0)
    sync()
    ttft = time.perf_counter() - start
    print(json.dumps({
        "device": args.device,
        "threads": torch.get_num_threads(),
        "batch1_tokens_per_s": batch1,
        "batched_tokens_per_s": batched,
        "batch": args.batch,
        "long_prompt_ttft_s": ttft,
    }))


if __name__ == "__main__":
    main()
