"""`mgjax serve`: OpenAI chat completions over plain HTTP, concurrent requests batched into one generate
call with each answer what its prompt gives alone; bad requests get 400 with the reason."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request

import pytest

from helpers import GOLDEN, golden_model
from mgjax.infer.server import Server

CASE = GOLDEN / "llama_vicuna"


@pytest.fixture(scope="module")
def served():
    model = golden_model()
    server = Server(model, port=0, max_batch=4).start()
    yield model, f"http://127.0.0.1:{server.address[1]}", server
    server.close()


def _post(url: str, body, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _image_part(path) -> dict:
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}}


def test_concurrent_requests_are_batched_and_answered_as_alone(served):
    model, _, _ = served
    questions = ["What is unusual about this image?", "Describe the colours.", "What is the man doing?"]
    # A server of its own whose batch closes when the three are in (or after 2 minutes): sharing a batch does
    # not depend on how soon a loaded machine schedules the client threads.
    server = Server(model, port=0, max_batch=len(questions), wait_s=120).start()
    url = f"http://127.0.0.1:{server.address[1]}"
    results = {}

    def ask(i, q):
        body = {"model": "x", "max_tokens": 5, "messages": [
            {"role": "system", "content": "ignored: the template has its own"},
            {"role": "user", "content": [{"type": "text", "text": q}, _image_part(CASE / "input.jpg")]}]}
        results[i] = _post(url, body)

    threads = [threading.Thread(target=ask, args=(i, q)) for i, q in enumerate(questions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.close()
    for i, q in enumerate(questions):
        status, reply = results[i]
        assert status == 200, reply
        ids, im, aux = model.prompt_inputs(q, [CASE / "input.jpg"])
        alone = model.generate([ids], im, aux, max_new_tokens=5)
        choice = reply["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": alone.text[0]}
        assert choice["finish_reason"] == ("stop" if alone.stopped[0] else "length")
        assert reply["usage"]["completion_tokens"] == int(alone.lengths[0])
        assert reply["usage"]["prompt_tokens"] == len(ids) - 1 + model.config.tokens_per_image
    assert max(server.batch_sizes) > 1  # at least two of the three requests shared a batch


@pytest.mark.parametrize("body,raw,culprit", [
    (None, b"{not json", "not JSON"),
    ({"messages": []}, None, "non-empty list"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, None, "alternate"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     None, "data URL"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
     None, "--allow-paths"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     None, "cannot read the image"),
    ({"n": 2, "messages": [{"role": "user", "content": "hi"}]}, None, "n > 1"),
    ({"max_tokens": "many", "messages": [{"role": "user", "content": "hi"}]}, None, "decoding setting"),
    ({"stop": [3], "messages": [{"role": "user", "content": "hi"}]}, None, "'stop'"),
])
def test_bad_requests_get_400_with_the_reason(served, body, raw, culprit):
    _, url, _ = served
    status, reply = _post(url, body, raw)
    assert status == 400 and culprit in reply["error"]["message"], reply
    # and the server still answers
    status, reply = _post(url, {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and reply["object"] == "chat.completion"


def test_models_route_and_unknown_routes(served):
    _, url, _ = served
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        assert json.loads(r.read())["data"][0]["id"] == "MGM-7B-tiny"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/v2/other", timeout=30)
    assert e.value.code == 404


def test_stream_true_gets_server_sent_events(served):
    """OpenAI clients with stream=True read `data: {chunk}` events ending in `data: [DONE]`."""
    _, url, _ = served
    body = {"max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    whole = _post(url, {**body, "stream": False})[1]["choices"][0]["message"]["content"]
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        events = [e[len("data: "):] for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
