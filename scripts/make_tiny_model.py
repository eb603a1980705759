#!/usr/bin/env python3
"""Turns a model directory written by `preble-modelgen` (the project's own BPE tokenizer and
configuration files) into a real Llama checkpoint: random weights from a fixed seed, saved by
Hugging Face `transformers` in its own layout (config.json, model.safetensors).

Presets:
  tiny        2 layers, hidden 64, 4 query / 2 KV heads: parity tests and end-to-end tests.
  bench-100m  12 layers, hidden 768, 12 query / 4 KV heads, MLP 3072 (~100M parameters).
"""
import argparse
import json
import pathlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 initializer_range=0.1),
    "bench-100m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False,
                       initializer_range=0.02),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=pathlib.Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base = json.loads((args.dir / "config.json").read_text())
    generation = (args.dir / "generation_config.json").read_text()
    config = LlamaConfig(
        vocab_size=base["vocab_size"],
        max_position_embeddings=base["max_position_embeddings"],
        rms_norm_eps=base.get("rms_norm_eps", 1e-5),
        rope_theta=base.get("rope_theta", 10000.0),
        bos_token_id=base.get("bos_token_id"),
        eos_token_id=base.get("eos_token_id"),
        hidden_act="silu",
        **PRESETS[args.preset],
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(args.dir, safe_serialization=True)
    # Keep the project's generation config (its stop tokens include the end of a chat turn).
    (args.dir / "generation_config.json").write_text(generation)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dir} ({args.preset}, {params / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
