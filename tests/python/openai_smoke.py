"""The official OpenAI Python client against a preble gateway.

Usage: openai_smoke.py BASE_URL MODEL. Every check raises on failure; on success it prints one
JSON object with what it saw, for the Rust test that runs it to check again.
"""

import json
import sys

import openai


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    seen = {}

    models = [m.id for m in client.models.list()]
    assert model in models, models
    seen["models"] = models

    prompt = "A shared system prompt about serving language models. " * 8
    first = client.completions.create(model=model, prompt=prompt, max_tokens=8, seed=3)
    assert first.object == "text_completion"
    assert first.choices[0].finish_reason == "length", first
    assert first.usage.completion_tokens == 8, first.usage
    seen["completion_text"] = first.choices[0].text
    again = client.completions.create(model=model, prompt=prompt, max_tokens=8, seed=3)
    assert again.choices[0].text == first.choices[0].text, "same seed, same text"
    seen["cached_tokens_on_repeat"] = again.usage.prompt_tokens_details.cached_tokens
    seen["prompt_tokens"] = again.usage.prompt_tokens

    chat_args = dict(
        model=model,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello."},
        ],
        max_tokens=6,
        seed=1,
    )
    chat = client.chat.completions.create(**chat_args)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 6, chat.usage
    seen["chat_text"] = chat.choices[0].message.content

    pieces, usage, finish = [], None, None
    for chunk in client.chat.completions.create(
        **chat_args,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == seen["chat_text"], (pieces, seen["chat_text"])
    assert usage is not None and usage.completion_tokens == 6, usage
    assert finish == "length", finish
    seen["streamed_chat_text"] = "".join(pieces)

    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt=prompt, max_tokens=8, seed=3, stream=True
        )
        if c.choices
    )
    assert streamed == seen["completion_text"], (streamed, seen["completion_text"])

    try:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        seen["unknown_model_code"] = e.code
    try:
        client.completions.create(model=model, prompt="hi", max_tokens=1, n=2)
        raise AssertionError("n=2 was accepted")
    except openai.BadRequestError as e:
        seen["n2_param"] = e.param

    print(json.dumps(seen))


if __name__ == "__main__":
    main()
