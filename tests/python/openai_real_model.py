"""The official OpenAI Python client against a preble gateway serving SmolLM2-135M-Instruct.

Usage: openai_real_model.py BASE_URL MODEL. Prints one JSON object with what it saw, for the
Rust test that runs it (tests/tests/real_model.rs) to check.
"""

import json
import sys

import openai


def chat(client, model, messages, **kwargs):
    return client.chat.completions.create(model=model, messages=messages, **kwargs)


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    seen = {}
    question = [{"role": "user", "content": "What is the capital of France?"}]

    answer = chat(client, model, question, max_tokens=40, temperature=0)
    seen["answer"] = answer.choices[0].message.content
    seen["answer_finish"] = answer.choices[0].finish_reason
    seen["answer_tokens"] = answer.usage.completion_tokens

    parts, finish = [], None
    for chunk in chat(client, model, question, max_tokens=40, temperature=0, stream=True):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    seen["streamed"] = "".join(parts)
    seen["streamed_finish"] = finish

    stopped = chat(client, model, question, max_tokens=40, temperature=0, stop=["Paris"])
    seen["stopped"] = stopped.choices[0].message.content
    seen["stopped_finish"] = stopped.choices[0].finish_reason

    poem = [{"role": "user", "content": "Write a short poem about the sea."}]
    sampled = [
        chat(client, model, poem, max_tokens=24, temperature=1.0, seed=seed).choices[0].message.content
        for seed in (7, 7, 8)
    ]
    seen["sampled"] = sampled

    system = "".join(f"Guideline {i}: keep answers short, exact and polite. " for i in range(60))
    for q in ("Name a colour.", "Name a fruit."):
        repeat = chat(
            client,
            model,
            [{"role": "system", "content": system}, {"role": "user", "content": q}],
            max_tokens=8,
            temperature=0,
        )
    seen["repeat_prompt_tokens"] = repeat.usage.prompt_tokens
    seen["repeat_cached_tokens"] = repeat.usage.prompt_tokens_details.cached_tokens

    scored = chat(client, model, question, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    content = scored.choices[0].logprobs.content
    seen["logprob_text"] = scored.choices[0].message.content
    seen["logprob_tokens"] = [t.token for t in content]
    seen["logprob_values"] = [t.logprob for t in content]
    seen["logprob_top"] = [[a.logprob for a in t.top_logprobs] for t in content]
    streamed_tokens = []
    for chunk in chat(client, model, question, max_tokens=12, temperature=0, stream=True,
                      logprobs=True, top_logprobs=2):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed_tokens += [t.token for t in chunk.choices[0].logprobs.content]
    seen["streamed_logprob_tokens"] = streamed_tokens

    try:
        chat(client, model, [{"role": "user", "content": "word " * 9000}], max_tokens=8)
        seen["too_long"] = "accepted"
    except openai.BadRequestError as e:
        seen["too_long"] = e.code
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
