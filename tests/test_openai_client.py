"""The official ``openai`` Python client against the real service: completions, chat, streaming (with usage),
``models.retrieve`` / ``models.list``, and errors raised as the client's typed exceptions with their status."""
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.model]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import openai

    from aded_ray.draft.matrix import TrigramMatrix
    from aded_ray.serve.local import LocalService

    d = tmp_path_factory.mktemp("openai")
    TrigramMatrix.empty(49152).save(d / "store.tri")
    s = LocalService(d, args={"num_replicas": 1, "num_cpus": 1, "store": str(d / "store.tri"), "max_new_tokens": 128,
                              "compile": False})       # eager passes: compile "auto" is test_serve_compiled's
    s.start()
    yield openai.OpenAI(base_url=s.base + "/v1", api_key="unused", max_retries=0, timeout=60)
    s.stop()


def test_completion(client):
    r = client.completions.create(model="smollm2", prompt="def add(a, b):", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat(client):
    r = client.chat.completions.create(model="smollm2", max_completion_tokens=8, temperature=0,
                                       messages=[{"role": "developer", "content": "Be brief."},
                                                 {"role": "user", "content": [{"type": "text", "text": "Hi!"}],
                                                  "name": "bob"}])
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and r.usage.completion_tokens <= 8


def test_streaming_chat_with_usage_equals_the_whole_answer(client):
    msgs = [{"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"


def test_streaming_completion(client):
    chunks = list(client.completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_models(client):
    m = client.models.retrieve("smollm2")
    assert m.id == "smollm2" and m.object == "model"
    assert [x.id for x in client.models.list()] == ["smollm2"]


def test_errors_are_typed_with_status(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt="x", max_tokens=0)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}], temperature=9)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:         # known before streaming: a status, not an event
        client.chat.completions.create(model="smollm2", stream=True,
                                       messages=[{"role": "user", "content": "word " * 6000}])
    assert e.value.status_code == 400 and e.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["param"] == "model"
