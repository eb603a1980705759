#!/usr/bin/env python3
"""Greedy log-probabilities from transformers, for the logprobs parity test: reads
{"model_dir": DIR, "text": PROMPT, "new_tokens": N, "top": K} on stdin and prints
{"prompt_ids": [...], "steps": [{"token": TEXT, "logprob": X, "top": [[TEXT, X], ...]}, ...]}:
the prompt's ids, then for each of N greedy steps the chosen token (decoded alone), its
log-probability under the model's softmax, and the K most likely tokens (float32, CPU)."""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

request = json.load(sys.stdin)
tokenizer = AutoTokenizer.from_pretrained(request["model_dir"])
model = AutoModelForCausalLM.from_pretrained(request["model_dir"], dtype=torch.float32)
model.eval()
ids = tokenizer(request["text"], add_special_tokens=False)["input_ids"]
decode = lambda i: tokenizer.decode([i], clean_up_tokenization_spaces=False)
steps, context = [], list(ids)
with torch.no_grad():
    for _ in range(request["new_tokens"]):
        logits = model(torch.tensor([context])).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = int(torch.argmax(logits))
        top = torch.topk(logprobs, request["top"])
        steps.append({
            "token": decode(chosen),
            "logprob": float(logprobs[chosen]),
            "top": [[decode(int(i)), float(v)] for v, i in zip(top.values, top.indices)],
        })
        context.append(chosen)
json.dump({"prompt_ids": ids, "steps": steps}, sys.stdout)
