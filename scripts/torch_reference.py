#!/usr/bin/env python3
"""Reference outputs of Hugging Face `transformers` for the torch engine's parity tests.

Reads prompts (a JSON list of token-id lists), runs each alone through LlamaForCausalLM in
f32 (or `--dtype bf16`), and writes a safetensors file with, for prompt i: `logits.i` (every position's logits,
[len, vocab]; with `--last-logits` only the last position's, [1, vocab]) and `greedy.i` (the
next N tokens by plain argmax, no end-of-sequence handling). Logits are written as f32.
"""
import argparse
import json
import pathlib

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=pathlib.Path)
    parser.add_argument("prompts", type=pathlib.Path)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--last-logits", action="store_true")
    parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    args = parser.parse_args()

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()
    prompts = json.loads(args.prompts.read_text())
    out = {}
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt], dtype=torch.long)
            result = model(ids, use_cache=True)
            logits = result.logits[0]
            out[f"logits.{i}"] = (logits[-1:] if args.last_logits else logits).float().contiguous()
            generated = []
            past = result.past_key_values
            for _ in range(args.greedy_tokens):
                next_id = int(logits[-1].argmax())
                generated.append(next_id)
                step = model(torch.tensor([[next_id]]), past_key_values=past, use_cache=True)
                logits, past = step.logits[0], step.past_key_values
            out[f"greedy.{i}"] = torch.tensor(generated, dtype=torch.long)
    save_file(out, str(args.out))


if __name__ == "__main__":
    main()
