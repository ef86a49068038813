"""`mgjax serve`: an OpenAI-compatible chat endpoint (`POST /v1/chat/completions`, `GET /v1/models`) over
`Pretrained.generate`, so that lmms-eval, VLMEvalKit or any OpenAI client can evaluate a model.

Concurrent requests are queued and batched: a worker takes the first waiting request, gathers up to
`max_batch` more with the same decoding settings for `wait_s`, and answers them with one jitted batch
(each row what it gives alone). A bad request gets HTTP 400 with the reason; nothing a client sends
stops the server.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from mgjax.data.image import load_image
from mgjax.data.templates import get_template, with_image_markers
from mgjax.errors import MGJaxError


class BadRequest(Exception):
    """What the client sent cannot be answered; the message says why (HTTP 400)."""


@dataclass
class _Job:
    ids: np.ndarray
    images: np.ndarray
    images_aux: np.ndarray
    settings: tuple  # requests batch together only when these are equal
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: str | None = None


def _image(url: str, allow_paths: bool):
    """An image from an OpenAI `image_url`: a data URL (base64), or a local path when allowed. No network."""
    if url.startswith("data:"):
        try:
            return load_image(base64.b64decode(url.split(",", 1)[1], validate=True))
        except (IndexError, ValueError) as e:
            raise BadRequest(f"image data URL is not base64 ({e})") from None
    if url.startswith(("http://", "https://")):
        raise BadRequest("image URLs over the network are not fetched: send the image as a data URL")
    if not allow_paths:
        raise BadRequest("local image paths are off (start the server with --allow-paths)")
    return load_image(Path(url[len("file://"):] if url.startswith("file://") else url))


def conversation(messages: Any, allow_paths: bool) -> tuple[list[str], list]:
    """OpenAI chat messages -> (turns user, assistant, ..., the user's last; images in order). A `system`
    message is ignored: the checkpoint's template brings its own."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    turns, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{i}] needs a role of system, user or assistant")
        if m["role"] == "system":
            continue
        want = "user" if len(turns) % 2 == 0 else "assistant"
        if m["role"] != want:
            raise BadRequest(f"messages[{i}] is from the {m['role']}; user and assistant turns must alternate, "
                             "starting with the user")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts")
        text, n_images = [], 0
        for p in parts:
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                text.append(p["text"])
            elif kind == "image_url" and m["role"] == "user":
                url = p.get("image_url", {})
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise BadRequest(f"messages[{i}]: an image_url part needs a url")
                try:
                    images.append(_image(url, allow_paths))
                except MGJaxError as e:
                    raise BadRequest(f"messages[{i}]: {e}") from None
                n_images += 1
            else:
                raise BadRequest(f"messages[{i}]: unsupported content part {p!r:.80}")
        turns.append((" ".join(text), n_images))
    if len(turns) % 2 == 0:
        raise BadRequest("the last message must be the user's")
    return turns, images


class Server:
    """The model, the request queue and the batching worker; `httpd` serves HTTP on `address`."""

    def __init__(self, model, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
                 wait_s: float = 0.02, model_id: str | None = None, allow_paths: bool = False):
        self.model, self.max_batch, self.wait_s, self.allow_paths = model, max_batch, wait_s, allow_paths
        self.model_id = model_id or Path(model.path).name
        self.batch_sizes: list[int] = []  # of every batch run (what the tests and logs look at)
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, daemon=True)
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.address = self.httpd.server_address

    def start(self) -> "Server":
        self._worker.start()
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._queue.put(None)

    # --- a request -----------------------------------------------------------------------------------

    def complete(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if body.get("n", 1) != 1:
            raise BadRequest("n > 1 is not supported")
        turns, images = conversation(body.get("messages"), self.allow_paths)
        m = self.model
        template = get_template(m.config.template)
        rendered = [with_image_markers(template, text, n) if i % 2 == 0 else text for i, (text, n) in enumerate(turns)]
        ids = m.tokenize(template.render([*rendered, None]))
        if images:
            pre = [m.preprocess(im) for im in images]
            pixels = np.stack([a for a, _ in pre]), np.stack([b for _, b in pre])
        else:
            pixels = m.zero_images()
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest("'stop' must be a string or a list of strings")
        stop = tuple(stop)
        try:
            temperature = float(body.get("temperature", 0.0) or 0.0)
            settings = (int(body.get("max_tokens") or body.get("max_completion_tokens") or 256), temperature,
                        float(body.get("top_p", 1.0) or 1.0), int(body.get("top_k", 0) or 0),
                        int(body.get("seed", 0) or 0) if temperature else 0, stop)
        except (TypeError, ValueError) as e:
            raise BadRequest(f"bad decoding setting ({e})") from None
        job = _Job(ids, *pixels, settings)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise BadRequest(job.error)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_id, **job.result}

    # --- the batching worker -------------------------------------------------------------------------

    def _work(self) -> None:
        while (first := self._queue.get()) is not None:
            group, later = [first], []
            deadline = time.monotonic() + self.wait_s
            while len(group) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    job = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)
                    break
                (group if job.settings == first.settings else later).append(job)
            for job in later:
                self._queue.put(job)
            self._run(group)

    def _run(self, group: list[_Job]) -> None:
        max_new, temperature, top_p, top_k, seed, stop = group[0].settings
        try:
            out = self.model.generate([j.ids for j in group], np.concatenate([j.images for j in group]),
                                      np.concatenate([j.images_aux for j in group]), max_new_tokens=max_new,
                                      temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop)
        except MGJaxError as e:  # a prompt too long, a setting out of range: that batch's clients hear why
            for j in group:
                j.error = str(e)
                j.done.set()
            return
        except Exception as e:  # never take the server down; answer 400 with what happened
            for j in group:
                j.error = f"generation failed ({type(e).__name__}: {e})"
                j.done.set()
            return
        self.batch_sizes.append(len(group))
        tpi = self.model.config.tokens_per_image
        for i, j in enumerate(group):
            n_img = int((j.ids < 0).sum())
            prompt_tokens = len(j.ids) + n_img * (tpi - 1)
            j.result = {"choices": [{"index": 0, "message": {"role": "assistant", "content": out.text[i]},
                                     "finish_reason": "stop" if out.stopped[i] else "length"}],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": int(out.lengths[i]),
                                  "total_tokens": prompt_tokens + int(out.lengths[i])}}
            j.done.set()


def _handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, reply: dict) -> None:
            """`stream: true`: the whole answer as one server-sent chunk, then its finish reason and [DONE]
            (answers are generated in batches, not token by token)."""
            choice = reply["choices"][0]
            head = {k: reply[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
            events = [{**head, "choices": [{"index": 0, "delta": choice["message"], "finish_reason": None}]},
                      {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]}]
            data = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str) -> None:
            self._send(code, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": server.model_id, "object": "model",
                                                             "owned_by": "mgjax"}]})
            else:
                self._error(404, f"no route {self.path}; POST /v1/chat/completions or GET /v1/models")

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}; POST /v1/chat/completions")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                reply = server.complete(body)
                if body.get("stream"):
                    self._stream(reply)
                else:
                    self._send(200, reply)
            except json.JSONDecodeError as e:
                self._error(400, f"the body is not JSON ({e})")
            except BadRequest as e:
                self._error(400, str(e))
            except MGJaxError as e:
                self._error(400, str(e))
            except Exception as e:  # a bug must answer, not kill the connection thread silently
                self._error(500, f"{type(e).__name__}: {e}")

        def log_message(self, fmt, *args):  # quiet: the access log would flood an evaluation's output
            pass

    return Handler
