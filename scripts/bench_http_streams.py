#!/usr/bin/env python3
"""Concurrent streaming completions against any OpenAI-compatible server (preble's gateway,
llama.cpp's llama-server, vLLM...), to compare serving engines over HTTP on the same load:
STREAMS clients at once, each a prompt of PROMPT token ids (seeded, distinct per client)
followed by NEW generated tokens, greedy, end of sequence ignored.

Prints the mean and largest time to first token, and the aggregate output rate: every
stream's tokens after its first, over the time from the first stream's first token to the last
stream's end (the decode phase).

Usage: bench_http_streams.py BASE_URL MODEL [--streams 16] [--prompt 128] [--new 128].
Standard library only.
"""
import argparse
import json
import random
import threading
import time
import urllib.request


def one_stream(base, model, prompt, new, out):
    body = json.dumps({
        "model": model, "prompt": prompt, "max_tokens": new, "temperature": 0,
        "ignore_eos": True, "stream": True,
    }).encode()
    request = urllib.request.Request(
        f"{base}/v1/completions", body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    first = None
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter()
    out.append({"started": started, "first": first, "ended": time.perf_counter()})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("model")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args()
    rng = random.Random(7)
    prompts = [[rng.randrange(100, 20_100) for _ in range(args.prompt)] for _ in range(args.streams)]
    # One request first, so that neither side counts its warm-up.
    one_stream(args.base, args.model, prompts[0][:16], 4, [])
    results = []
    threads = [
        threading.Thread(target=one_stream, args=(args.base, args.model, p, args.new, results))
        for p in prompts
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(results) != args.streams or any(r["first"] is None for r in results):
        raise SystemExit(f"only {len(results)} of {args.streams} streams produced tokens")
    ttft = [r["first"] - r["started"] for r in results]
    decode_s = max(r["ended"] for r in results) - min(r["first"] for r in results)
    rate = args.streams * (args.new - 1) / decode_s
    print(f"{args.base} {args.model}: {args.streams} streams x ({args.prompt} prompt + {args.new} new)")
    print(f"  time to first token: mean {sum(ttft) / len(ttft):.2f} s, largest {max(ttft):.2f} s")
    print(f"  output tokens/s after the first tokens, all streams together: {rate:.1f}")


if __name__ == "__main__":
    main()
