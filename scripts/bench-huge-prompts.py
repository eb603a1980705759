#!/usr/bin/env python3
"""32 concurrent 2 MB prompts against a running gateway, then its resident memory over time.

Usage: scripts/bench-huge-prompts.py PORT MODEL PID
Serve a model whose context is long enough that 2 MB prompts are really tokenised (for example
`preble-modelgen --out /tmp/longctx --context-len 1048576`); each request asks for the whole
context as max_tokens, so it is tokenised and then refused with context_length_exceeded.
"""
import concurrent.futures
import json
import sys
import time
import urllib.error
import urllib.request

port, model, pid = sys.argv[1], sys.argv[2], sys.argv[3]


def rss_mb():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                yield line.split(":")[0], int(line.split()[1]) // 1024


prompt = "lorem ipsum dolor sit amet " * (2_000_000 // 27)
body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 1 << 20}).encode()


def send(_):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=body,
        headers={"content-type": "application/json"},
    )
    try:
        urllib.request.urlopen(request, timeout=600)
        return 200
    except urllib.error.HTTPError as e:
        return e.code


print("before:", dict(rss_mb()))
started = time.time()
with concurrent.futures.ThreadPoolExecutor(32) as pool:
    codes = list(pool.map(send, range(32)))
print(f"32 requests answered {sorted(set(codes))} in {time.time() - started:.1f} s")
for after, pause in ((0, 0), (15, 15), (30, 15)):
    time.sleep(pause)
    print(f"{after:>2} s after:", dict(rss_mb()))
