#!/usr/bin/env python3
"""What transformers makes of conversations on a model directory, for the parity tests: reads
{"model_dir": DIR, "conversations": [[{"role", "content"}, ...], ...], "decode": [[id, ...], ...]}
on stdin and prints {"prompts": [[id, ...], ...], "decoded": [text, ...]}: each conversation's
`apply_chat_template(..., add_generation_prompt=True)` ids, and each id list's `decode` with
special tokens skipped (what an OpenAI-compatible server streams, `skip_special_tokens=True`)."""
import json
import sys

from transformers import AutoTokenizer

request = json.load(sys.stdin)
tokenizer = AutoTokenizer.from_pretrained(request["model_dir"])
prompts = [
    tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)
    for c in request["conversations"]
]
decoded = [tokenizer.decode(ids, skip_special_tokens=True) for ids in request.get("decode", [])]
json.dump({"prompts": prompts, "decoded": decoded}, sys.stdout)
