#!/usr/bin/env python3
"""Talk to `equicrypt proxy` with the official `openai` Python package and print what came back.

Usage: python3 scripts/openai_proxy_check.py BASE_URL [PROMPT [SYSTEM [COMPLETION_PROMPT]]]

BASE_URL is the proxy (`http://127.0.0.1:8081`, with or without `/v1`). Runs
client.models.list(), client.chat.completions.create non-streamed and streamed (with
stream_options.include_usage) and client.completions.create, greedy, and prints one JSON object.
PROMPT (the user message) and SYSTEM (an optional system message) make the chat; COMPLETION_PROMPT
the text completion. The defaults are prompts whose greedy SmolLM2 answers have wide margins.



  {"openai_version", "models", "chat": {content, finish_reason, usage, id, object},
   "chat_stream": {content, chunks, roles, finish_reason, usage, usage_chunks},
   "completion": {text, finish_reason, usage, object}}

Exits non-zero (with the exception on stderr) when any call fails.
"""

import json
import sys

import openai


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    base = sys.argv[1].rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    prompt = sys.argv[2] if len(sys.argv) > 2 else "What is the capital of France? Answer in one sentence."
    system = sys.argv[3] if len(sys.argv) > 3 else "You are a helpful assistant."
    completion_prompt = sys.argv[4] if len(sys.argv) > 4 else "1, 2, 3, 4, 5,"
    # The proxy holds the key itself and ignores the API key; the package insists on one.
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
    out = {"openai_version": openai.__version__}

    out["models"] = [m.id for m in client.models.list().data]
    model = out["models"][0]
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})

    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=48)
    out["chat"] = {
        "id": r.id,
        "object": r.object,
        "content": r.choices[0].message.content,
        "role": r.choices[0].message.role,
        "finish_reason": r.choices[0].finish_reason,
        "usage": r.usage.model_dump() if r.usage else None,
    }

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    content, roles, chunks, finish, usage, usage_chunks = [], [], 0, None, None, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
            usage_chunks += 1
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                content.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    out["chat_stream"] = {
        "content": "".join(content),
        "pieces": len(content),
        "chunks": chunks,
        "roles": roles,
        "finish_reason": finish,
        "usage": usage,
        "usage_chunks": usage_chunks,
    }

    c = client.completions.create(model=model, prompt=completion_prompt, temperature=0, max_tokens=8)
    out["completion"] = {
        "object": c.object,
        "text": c.choices[0].text,
        "finish_reason": c.choices[0].finish_reason,
        "usage": c.usage.model_dump() if c.usage else None,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
