#!/usr/bin/env python3
"""Drives a tollgate gateway with the official `openai` Python SDK.

Run by tests/openai_sdk.rs (it can also be run by hand against a running
gateway). The client is a plain `openai.OpenAI()`, configured only by the
environment, as a user's would be:

    OPENAI_BASE_URL  the gateway's /v1, e.g. http://localhost:8080/v1
    OPENAI_API_KEY   a gateway key, gw_live_...
    MODEL            the model to ask for, e.g. mock-1
    PROMPT           optional: the user message to send

It makes a chat completion, the same streamed (with and without
`stream_options.include_usage`), an embeddings request, and two requests that
must fail (an unknown model, and `FAIL_MODEL` when set), then prints one JSON
object with what the SDK returned. Any unexpected SDK error ends the script
with a traceback and a non-zero exit status.
"""

import json
import os
import sys

import openai

DEFAULT_PROMPT = "Say hello to the gateway from the official OpenAI Python SDK please"


def usage_of(usage):
    return None if usage is None else usage.model_dump(exclude_none=True)


def chat(client, model, messages):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)
    completion = raw.parse()
    choice = completion.choices[0]
    return {
        "request_id": raw.headers.get("x-request-id"),
        "provider": raw.headers.get("x-tollgate-provider"),
        "id": completion.id,
        "object": completion.object,
        "model": completion.model,
        "role": choice.message.role,
        "content": choice.message.content,
        "finish_reason": choice.finish_reason,
        "usage": usage_of(completion.usage),
    }


def chat_stream(client, model, messages, **options):
    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True, **options
    )
    result = {
        "request_id": stream.response.headers.get("x-request-id"),
        "provider": stream.response.headers.get("x-tollgate-provider"),
        "content_type": stream.response.headers.get("content-type"),
        "chunks": 0,
        "pieces": [],
        "finish_reason": None,
        "usage": None,
        "usage_chunks": 0,
        "usage_chunk_choices": None,
    }
    for chunk in stream:
        result["chunks"] += 1
        if chunk.usage is not None:
            result["usage_chunks"] += 1
            result["usage"] = usage_of(chunk.usage)
            result["usage_chunk_choices"] = len(chunk.choices)
        for choice in chunk.choices:
            if choice.delta.content:
                result["pieces"].append(choice.delta.content)
            if choice.finish_reason:
                result["finish_reason"] = choice.finish_reason
    result["content"] = "".join(result["pieces"])
    return result


def embeddings(client, model, inputs):
    raw = client.embeddings.with_raw_response.create(model=model, input=inputs)
    response = raw.parse()
    return {
        "request_id": raw.headers.get("x-request-id"),
        "indexes": [item.index for item in response.data],
        "lengths": [len(item.embedding) for item in response.data],
        "vectors": [list(item.embedding) for item in response.data],
        "usage": usage_of(response.usage),
    }


def expect_error(client, model, messages):
    """The SDK's exception for a request that must fail."""
    try:
        client.chat.completions.create(model=model, messages=messages)
    except openai.APIStatusError as error:
        body = error.body if isinstance(error.body, dict) else {}
        return {
            "exception": type(error).__name__,
            "status": error.status_code,
            "code": error.code,
            "type": error.type,
            "message": body.get("message"),
            "request_id": error.response.headers.get("x-request-id"),
        }
    raise AssertionError(f"a request for {model!r} did not fail")


def main():
    model = os.environ["MODEL"]
    prompt = os.environ.get("PROMPT", DEFAULT_PROMPT)
    messages = [{"role": "user", "content": prompt}]
    # Configured by OPENAI_BASE_URL and OPENAI_API_KEY, nothing else.
    client = openai.OpenAI()
    results = {
        "sdk_version": openai.__version__,
        "base_url": str(client.base_url),
        "chat": chat(client, model, messages),
        "stream": chat_stream(client, model, messages),
        "stream_with_usage": chat_stream(
            client, model, messages, stream_options={"include_usage": True}
        ),
        "embeddings": embeddings(client, model, ["hello world", "goodbye world"]),
        "unknown_model": expect_error(client, "no-such-model", messages),
    }
    fail_model = os.environ.get("FAIL_MODEL")
    if fail_model:
        # No retries: the SDK would retry a 5xx twice by default.
        results["failing_model"] = expect_error(
            client.with_options(max_retries=0), fail_model, messages
        )
    json.dump(results, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
