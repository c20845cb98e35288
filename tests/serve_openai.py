"""The official `openai` Python package against `ember serve`, as a user would use it.

Run by tests/serve.rs (openai_python_client) with the server's base URL:
    python tests/serve_openai.py http://127.0.0.1:PORT/v1 MODEL_ID
Exits non-zero (an AssertionError or the client's exception) when anything is off.
"""

import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="sekret", max_retries=0)

messages = [{"role": "user", "content": "What is 2+2?"}]

# Non-streaming.
r = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
assert r.object == "chat.completion", r
assert r.choices[0].message.role == "assistant", r
whole = r.choices[0].message.content
assert whole, r
assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 0, r.usage
assert r.usage.prompt_tokens_details.cached_tokens is not None, r.usage

# Streaming: content deltas, then a usage chunk with no choices.
deltas, usage, finish = [], None, None
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0,
    stream=True, stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        assert chunk.choices == [], chunk
        usage = chunk.usage
        continue
    c = chunk.choices[0]
    if c.delta.content:
        assert usage is None, "content after usage"
        deltas.append(c.delta.content)
    if c.finish_reason:
        finish = c.finish_reason
assert len(deltas) >= 1, deltas
assert "".join(deltas) == whole, (deltas, whole)
assert finish == r.choices[0].finish_reason, finish
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage

# Completions, and the models list.
c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
assert c.choices[0].text and c.usage.completion_tokens >= 1, c
assert [m.id for m in client.models.list()] == [model]

# Errors come back as the client's typed exceptions.
try:
    client.chat.completions.create(model=model, messages=messages, n=2)
    raise SystemExit("n=2 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError:
    pass
bad = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
try:
    bad.models.list()
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError:
    pass
print("openai client: ok", len(deltas), "deltas,", usage.completion_tokens, "tokens")
