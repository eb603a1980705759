#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) on the GGUF that `make real-model` converts, with the
torch engine benchmark's measures where its single-sequence API has them: decode tokens/s at
batch 1 (128-token prompt, 128 new tokens, greedy, end of sequence ignored), and the time to
first token of a 2,048-token prompt cold and with its first 1,920 tokens cached (llama.cpp
keeps the longest common prefix of consecutive prompts in its KV cache).

Usage: bench_llamacpp.py GGUF [--threads 2]. Run with a Python that has llama-cpp-python.
"""
import argparse
import random
import time

from llama_cpp import Llama


def prompt(rng, n):
    return [rng.randrange(100, 20_100) for _ in range(n)]


def first_token_s(llm, tokens):
    started = time.perf_counter()
    for _ in llm.generate(tokens, temp=0.0):
        return time.perf_counter() - started
    raise RuntimeError("no token")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rng = random.Random(7)
    llm = Llama(model_path=args.gguf, n_ctx=4096, n_threads=args.threads, n_batch=512, verbose=False)

    short = prompt(rng, 128)
    llm.reset()
    started, first, n = time.perf_counter(), None, 0
    for _ in llm.generate(short, temp=0.0):
        n += 1
        if first is None:
            first = time.perf_counter()
        if n == 128:
            break
    decode_tps = (n - 1) / (time.perf_counter() - first)
    prefill_s = first - started

    long = prompt(rng, 2048)
    llm.reset()
    cold = first_token_s(llm, long)
    warm_prompt = long[:1920] + prompt(rng, 128)
    warm = first_token_s(llm, warm_prompt)
    print(f"llama.cpp {args.gguf}, {args.threads} threads")
    print("| measure | llama.cpp |")
    print("|---|---|")
    print(f"| decode tokens/s, batch 1 (128 prompt + 128 new) | {decode_tps:.1f} |")
    print(f"| prefill of the 128-token prompt | {prefill_s:.3f} s |")
    print(f"| time to first token, 2,048-token prompt, cold | {cold:.3f} s |")
    print(f"| time to first token, first 1,920 tokens cached | {warm:.3f} s ({cold / warm:.1f}x lower) |")


if __name__ == "__main__":
    main()
