"""`mgjax serve`: an OpenAI-compatible chat endpoint (`POST /v1/chat/completions`, `GET /v1/models`) over
the continuous-batching engine (`mgjax.infer.engine`), so that lmms-eval, VLMEvalKit or any OpenAI client
can evaluate a model; a chat page at `/`, `GET /health` and Prometheus `GET /metrics` for operators.

Every request joins the running batch as soon as a slot is free and leaves it when its answer ends, each
answer what its prompt gives alone; `stream: true` sends one server-sent event per decoded token. A bad
request gets HTTP 400 with the reason, one over `max_concurrent` 429 with Retry-After, a body over `max_body`
413, one whose body stalls past `timeout_s` 408 and one whose answer does 504, and a client that hangs up
frees its slot; nothing a client sends stops the server, and what requests hold is bounded (`max_concurrent`
of them, each a body of at most `max_body` bytes and images within PIL's pixel limit; preprocessed images kept
for reuse, `image_cache` bytes, and their visual tokens, `encoder_cache` bytes of the device's memory).
`drain` (SIGTERM) answers what is in flight, refuses new requests (503) and returns.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import io
import json
import queue
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mgjax.data.templates import get_template, with_image_markers
from mgjax.errors import MGJaxError
from mgjax.infer.engine import BytesLRU, Engine, Request

PAGE = Path(__file__).with_name("page.html")


class BadRequest(Exception):
    """What the client sent cannot be answered; the message says why (HTTP 400)."""


def _image(url: str, allow_paths: bool) -> bytes:
    """The file bytes of an OpenAI `image_url`: a data URL (base64), or a local path when allowed. No network."""
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.split(",", 1)[1], validate=True)
        except (IndexError, ValueError) as e:
            raise BadRequest(f"image data URL is not base64 ({e})") from None
    if url.startswith(("http://", "https://")):
        raise BadRequest("image URLs over the network are not fetched: send the image as a data URL")
    if not allow_paths:
        raise BadRequest("local image paths are off (start the server with --allow-paths)")
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    try:
        return path.read_bytes()
    except OSError as e:
        raise BadRequest(f"{path}: cannot read the image ({type(e).__name__}: {e.strerror})") from None


class ImageCache(BytesLRU):
    """Preprocessed images (`Pretrained.preprocess`'s arrays, read-only) by a digest of their file's bytes,
    the least recently used dropped past `max_bytes`: a chat sends its images again with every turn, and an
    evaluation asks several questions of one image; each would decode and resize it again."""

    def preprocessed(self, data: bytes, preprocess) -> tuple[bytes, tuple[np.ndarray, ...]]:
        """(the digest of `data`, which also keys the engine's visual tokens; `preprocess(data)`, or what it
        gave for the same bytes before)."""
        key = hashlib.blake2b(data, digest_size=16).digest()
        if (found := self.get(key)) is not None:
            return key, found
        arrays = tuple(preprocess(data))  # outside the lock: other requests' images decode meanwhile
        for a in arrays:
            a.setflags(write=False)  # shared by every request that sends these bytes
        self.put(key, arrays, sum(a.nbytes for a in arrays))
        return key, arrays


def conversation(messages: Any, allow_paths: bool, preprocess) -> tuple[list[str], list]:
    """OpenAI chat messages -> (turns user, assistant, ..., the user's last; `preprocess(file bytes)` of each
    image, in order). A `system` message is ignored: the checkpoint's template brings its own."""
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
                    images.append(preprocess(_image(url, allow_paths)))
                except MGJaxError as e:
                    raise BadRequest(f"messages[{i}]: {e}") from None
                n_images += 1
            else:
                raise BadRequest(f"messages[{i}]: unsupported content part {p!r:.80}")
        turns.append((" ".join(text), n_images))
    if len(turns) % 2 == 0:
        raise BadRequest("the last message must be the user's")
    return turns, images


class Histogram:
    """A Prometheus histogram of seconds."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

    def __init__(self):
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, x: float) -> None:
        self.counts[next((i for i, b in enumerate(self.BUCKETS) if x <= b), len(self.BUCKETS))] += 1
        self.sum += x

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for b, n in zip((*map(str, self.BUCKETS), "+Inf"), self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{b}"}} {total}')
        return [*out, f"{name}_sum {self.sum}", f"{name}_count {total}"]


def _settings(body: dict) -> dict:
    """The decoding settings of a request body, checked as OpenAI's API checks them."""
    def number(key, kind, default, ok, want):
        value = body.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise BadRequest(f"bad decoding setting: '{key}' must be {want}, got {value!r:.40}")
        if not ok(value):
            raise BadRequest(f"bad decoding setting: '{key}' must be {want}, got {value}")
        return kind(value)

    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings")
    temperature = number("temperature", float, 0.0, lambda x: 0 <= x <= 2, "a number in [0, 2]")
    budget = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return {"max_tokens": number(budget, int, 256, lambda x: x >= 1, "an integer >= 1"),
            "temperature": temperature,
            "top_p": number("top_p", float, 1.0, lambda x: 0 < x <= 1, "a number in (0, 1]"),
            "top_k": number("top_k", int, 0, lambda x: x >= 0, "an integer >= 0"),
            "seed": number("seed", int, 0, lambda x: 0 <= x < 2**32, "an integer in [0, 2**32)") if temperature
            else 0, "stop": tuple(stop)}


class Server:
    """The engine, the HTTP server on `address` and the operational state (in-flight requests, metrics)."""

    def __init__(self, model, host: str = "127.0.0.1", port: int = 8000, slots: int = 8,
                 context: int | None = None, max_concurrent: int = 64, timeout_s: float = 600.0,
                 model_id: str | None = None, allow_paths: bool = False, warm_text: int = 128,
                 max_body: int = 64 << 20, image_cache: int = 1 << 30, encoder_cache: int = 256 << 20):
        self.model, self.allow_paths = model, allow_paths
        self.images = ImageCache(image_cache)
        self.max_concurrent, self.timeout_s, self.max_body = max_concurrent, timeout_s, max_body
        self.model_id = model_id or Path(model.path).name
        self.engine = Engine(model, slots, context, warm_text, encoder_cache)
        self.engine.on_token = self._on_token
        self.inflight = 0
        self.draining = False
        self._lock = threading.Condition()
        self.ttft, self.latency = Histogram(), Histogram()
        self.counts = {"requests": 0, "rejected_busy": 0, "timeouts": 0, "disconnects": 0}
        self._recent: collections.deque[float] = collections.deque()  # when each token of the last 10 s came
        self.httpd = _HTTPServer((host, port), _handler(self))
        self.address = self.httpd.server_address

    def start(self, warm: bool = True) -> "Server":
        """Serves HTTP at once (/health says "warming" until the engine has compiled its programs and a
        request's image path has run once); requests sent meanwhile wait for it."""
        if warm:  # the first JPEG decode, resize and tokenization load and compile what they use (~0.3 s)
            jpeg = io.BytesIO()
            Image.new("RGB", (64, 48)).save(jpeg, format="JPEG")
            self.request({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "warm"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,"
                                                    + base64.b64encode(jpeg.getvalue()).decode()}}]}]}, 0.0)
        self.engine.start(warm)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.engine.ready.wait(timeout)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.engine.stop()

    def drain(self) -> None:
        """Refuses new requests (503) and returns once every accepted one has been answered."""
        with self._lock:
            self.draining = True
            while self.inflight:
                self._lock.wait()

    def _on_token(self, now: float) -> None:
        self._recent.append(now)
        while self._recent[0] < now - 10:
            self._recent.popleft()

    def metrics(self) -> str:
        e = self.engine
        now = time.monotonic()
        lines = ["# TYPE mgjax_queue_depth gauge", f"mgjax_queue_depth {len(e.waiting)}",
                 "# TYPE mgjax_active_slots gauge", f"mgjax_active_slots {e.active}",
                 "# TYPE mgjax_slots gauge", f"mgjax_slots {e.slots}",
                 "# TYPE mgjax_inflight_requests gauge", f"mgjax_inflight_requests {self.inflight}",
                 "# TYPE mgjax_tokens_per_second gauge",
                 f"mgjax_tokens_per_second {sum(t >= now - 10 for t in tuple(self._recent)) / 10}",
                 "# TYPE mgjax_generated_tokens_total counter", f"mgjax_generated_tokens_total {e.stats['tokens']}",
                 "# TYPE mgjax_decode_steps_total counter", f"mgjax_decode_steps_total {e.stats['steps']}",
                 *_cache_lines("mgjax_image_cache", self.images), *_cache_lines("mgjax_encoder_cache", e.encoded)]
        for key, value in self.counts.items():
            lines += [f"# TYPE mgjax_{key}_total counter", f"mgjax_{key}_total {value}"]
        for name, h in (("mgjax_time_to_first_token_seconds", self.ttft), ("mgjax_request_latency_seconds",
                                                                           self.latency)):
            lines += [f"# TYPE {name} histogram", *h.lines(name)]
        return "\n".join(lines) + "\n"

    # --- a request -----------------------------------------------------------------------------------

    def request(self, body: dict, arrived: float) -> Request:
        """The engine's request for an OpenAI chat body that arrived at `arrived` (time.monotonic; its
        timeout, time to first token and latency count from then); BadRequest says what is wrong with it."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if body.get("n", 1) != 1:
            raise BadRequest("n > 1 is not supported")
        m = self.model
        turns, images = conversation(body.get("messages"), self.allow_paths,
                                     lambda data: self.images.preprocessed(data, m.preprocess))
        template = get_template(m.config.template)
        rendered = [with_image_markers(template, text, n) if i % 2 == 0 else text for i, (text, n) in enumerate(turns)]
        ids = m.tokenize(template.render([*rendered, None]))
        # one image (most requests) is passed as a view of the cached arrays: an HD image's are 35 MB
        pixels = ([x[0][None] if len(x) == 1 else np.stack(x) for x in zip(*(arrays for _, arrays in images))]
                  if images else m.zero_images())
        return Request(ids, *pixels, **_settings(body), stream=bool(body.get("stream")), submitted=arrived,
                       image_keys=tuple(key for key, _ in images), preprocessed=True)

    def admit(self) -> None:
        """Counts a request in, or raises (429 over `max_concurrent`, 503 while draining)."""
        with self._lock:
            if self.draining:
                raise _Refused(503, "the server is shutting down")
            if self.inflight >= self.max_concurrent:
                self.counts["rejected_busy"] += 1
                raise _Refused(429, f"the server is at its limit of {self.max_concurrent} concurrent requests; "
                               "retry later")
            self.inflight += 1
            self.counts["requests"] += 1

    def release(self, req: Request | None) -> None:
        with self._lock:
            self.inflight -= 1
            self._lock.notify_all()
            if req is not None and req.finish_reason is not None:
                self.latency.observe(time.monotonic() - req.submitted)
                self.ttft.observe(req.first_token_at - req.submitted)

    def reply(self, req: Request) -> dict:
        """The chat.completion of a finished request."""
        prompt_tokens = req.length
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": req.answer},
                             "finish_reason": req.finish_reason}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(req.tokens),
                          "total_tokens": prompt_tokens + len(req.tokens)}}


def _cache_lines(name: str, cache: BytesLRU) -> list[str]:
    return [f"# TYPE {name}_bytes gauge", f"{name}_bytes {cache.bytes}",
            f"# TYPE {name}_hits_total counter", f"{name}_hits_total {cache.hits}",
            f"# TYPE {name}_misses_total counter", f"{name}_misses_total {cache.misses}"]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: a burst of clients connecting at once is not reset (default 5)


class _Refused(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Gone(Exception):
    """The client hung up."""


class _Late(Exception):
    """The request body did not arrive within the server's timeout (HTTP 408)."""


def _hung_up(sock) -> bool:
    """Whether the client closed its side (readable, and nothing to read)."""
    try:
        return bool(select.select([sock], [], [], 0)[0]) and not sock.recv(1, socket.MSG_PEEK)
    except OSError:
        return True


_NOWAIT = getattr(socket, "MSG_DONTWAIT", 0)  # 0 (Windows): every chunk goes through the handler's thread


def _event(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


class _Stream:
    """A streamed answer's server-sent events. The engine's thread sends each token's chunk to the socket
    itself, without blocking (waking the handler's thread for every token cost more than the send: 8 streams
    woke 8 threads per decode step); what the socket does not take at once, or comes before the headers went
    out, waits in `pending` for the handler's thread, which sends it in order (`flush`, woken by a ("flush",
    None) event). `end` queues the handler's last events (the finish, or an error) after which the engine's
    chunks are dropped."""

    def __init__(self, req: Request, sock: socket.socket, head: dict):
        self.req, self.sock, self.head = req, sock, head
        self.pending = bytearray()
        self.lock = threading.Lock()
        self.headers_sent = self.flushing = self.ended = self.gone = False
        self.first = True

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {**self.head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    def token(self, text: str) -> None:
        """A token's delta, on the engine's thread (`Request.on_delta`)."""
        data = _event(self.chunk({"role": "assistant", "content": text} if self.first else {"content": text}))
        self.first = False
        with self.lock:
            if self.ended or self.gone:
                return
            if self.headers_sent and _NOWAIT and not self.pending and not self.flushing:
                try:
                    sent = self.sock.send(data, _NOWAIT)
                except BlockingIOError:  # the client reads slower than we send: its thread waits for it
                    sent = 0
                except OSError:  # it hung up
                    self.gone = True
                    self.req.cancel()
                    sent = len(data)
                data = data[sent:]
            self.pending += data
            wake = self.gone or bool(self.pending) and self.headers_sent and not self.flushing
        if wake:
            self.req.events.put(("flush", None))

    def open(self) -> None:
        """The headers went out: sends what came before them."""
        with self.lock:
            self.headers_sent = True
        self.flush()

    def flush(self) -> None:
        """Sends what waits, in order (blocking, on the handler's thread); raises _Gone once the client hung up."""
        while True:
            with self.lock:
                if self.gone:
                    raise _Gone()
                if not self.pending:
                    self.flushing = False
                    return
                data, self.pending, self.flushing = bytes(self.pending), bytearray(), True
            try:
                self.sock.sendall(data)
            except OSError:
                with self.lock:
                    self.gone = True

    def end(self, *events: dict | str) -> None:
        """The last events; the engine's chunks after them are dropped."""
        with self.lock:
            self.ended = True
            self.pending += b"".join(map(_event, events))
        self.flush()


def _handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, payload: dict | str, content_type: str = "application/json",
                  headers: dict | None = None) -> None:
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str, kind: str = "invalid_request_error") -> None:
            # a client told to come back (busy, draining) is told when: OpenAI's clients honour Retry-After
            retry = {"Retry-After": "1"} if code in (429, 503) else None
            self._send(code, {"error": {"message": message, "type": kind, "code": code}}, headers=retry)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            path = self.path.split("?")[0].rstrip("/")
            if path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": server.model_id, "object": "model",
                                                             "owned_by": "mgjax"}]})
            elif path == "/health":
                status = "draining" if server.draining else "ok" if server.engine.ready.is_set() else "warming"
                self._send(200 if status == "ok" else 503, {"status": status, "slots": server.engine.slots,
                                                            "active": server.engine.active})
            elif path == "/metrics":
                self._send(200, server.metrics(), "text/plain; version=0.0.4")
            elif path == "":
                self._send(200, PAGE.read_text().replace("{{MODEL}}", server.model_id), "text/html; charset=utf-8")
            else:
                self._error(404, f"no route {self.path}; POST /v1/chat/completions, GET /, /v1/models, /health, "
                            "/metrics")

        def do_POST(self):  # noqa: N802
            arrived = time.monotonic()
            deadline = arrived + server.timeout_s
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:  # where the body ends is unknown: nothing more is read
                self._error(400, "the Content-Length header must be the body's size in bytes")
                return
            try:
                if length > server.max_body:  # each request in flight holds its body: that bounds the memory
                    raise _Refused(413, f"the request body of {length} bytes is over the server's limit of "
                                   f"{server.max_body} bytes; send smaller images")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    raise _Refused(404, f"no route {self.path}; POST /v1/chat/completions")
                server.admit()
            except _Refused as e:
                self._skip(length, deadline)
                self._error(e.code, str(e), {429: "rate_limit_error", 503: "server_error"}.get(
                    e.code, "invalid_request_error"))
                return
            req = None
            try:
                body = json.loads(self._read(length, deadline) or b"null")
                req = server.request(body, arrived)
                stream = _Stream(req, self.connection, {
                    "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                    "created": int(time.time()), "model": server.model_id}) if req.stream else None
                if stream is not None:
                    req.on_delta = stream.token
                server.engine.submit(req)
                if stream is not None:
                    self._stream(req, stream, bool((body.get("stream_options") or {}).get("include_usage")))
                else:
                    self._wait(req)
                    self._send(200, server.reply(req))
            except json.JSONDecodeError as e:
                self._error(400, f"the body is not JSON ({e})")
            except (BadRequest, MGJaxError) as e:
                self._error(400, str(e))
            except _Late as e:
                self._error(408, str(e), "timeout")
            except TimeoutError as e:
                self._error(504, str(e), "timeout")
            except (_Gone, BrokenPipeError, ConnectionResetError):
                server.counts["disconnects"] += 1
                if req is not None:
                    req.cancel()
            except Exception as e:  # a bug must answer, not kill the connection thread silently
                self._error(500, f"{type(e).__name__}: {e}")
            finally:
                server.release(req)

        def _read(self, length: int, deadline: float, keep: bool = True) -> bytes:
            """The request body, `length` bytes, as it arrives by `deadline` (time.monotonic; dropped as read
            unless `keep`); raises _Late past it (a client that stops sending would hold its slot for ever)
            and _Gone when the client hangs up first."""
            chunks = []
            try:
                while length > 0:
                    self.connection.settimeout(max(deadline - time.monotonic(), 1e-3))
                    chunk = self.rfile.read1(min(length, 1 << 16))
                    if not chunk:
                        raise _Gone()
                    length -= len(chunk)
                    if keep:
                        chunks.append(chunk)
            except TimeoutError:
                raise _Late(f"the request body did not arrive within the server's timeout of {server.timeout_s:g} "
                            "s (--timeout)") from None
            finally:
                self.connection.settimeout(None)
            return b"".join(chunks)

        def _skip(self, length: int, deadline: float) -> None:
            """Reads and drops the body of a refused request: replying while the client still sends would lose
            the reply (a socket closed with unread data resets the connection, so a client sending a body
            larger than the socket buffers, a photo's data URL, fails with a broken pipe instead of its 429)."""
            with contextlib.suppress(_Late, _Gone, OSError):
                self._read(length, deadline, keep=False)

        def _events(self, req: Request):
            """The request's engine events until it ends; raises TimeoutError past the server's timeout and
            _Gone when the client hangs up (both cancel the request, which frees its slot)."""
            deadline = req.submitted + server.timeout_s
            while True:
                try:
                    kind, value = req.events.get(timeout=min(0.1, max(deadline - time.monotonic(), 0)))
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        req.cancel()
                        server.counts["timeouts"] += 1
                        raise TimeoutError(f"no answer within the server's timeout of {server.timeout_s:g} s "
                                           "(--timeout)") from None
                    if _hung_up(self.connection):
                        req.cancel()
                        raise _Gone() from None
                    continue
                if kind == "error":
                    raise BadRequest(value)
                yield kind, value
                if kind == "done":
                    return

        def _wait(self, req: Request) -> None:
            for _ in self._events(req):
                pass

        def _stream(self, req: Request, stream: _Stream, include_usage: bool) -> None:
            """Server-sent events: one chunk per decoded token (its new text; the first carries the role; sent
            by `stream`), then the finish reason (and the usage when asked), then [DONE]. An error after the
            headers went out is sent as an `error` event."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            stream.open()
            try:
                for kind, _ in self._events(req):
                    if kind == "flush":
                        stream.flush()
            except (BadRequest, TimeoutError) as e:
                stream.end({"error": {"message": str(e), "type": "timeout" if isinstance(e, TimeoutError) else
                                      "invalid_request_error"}}, "[DONE]")
                return
            usage = [{**stream.head, "choices": [], "usage": server.reply(req)["usage"]}] if include_usage else []
            stream.end(stream.chunk({}, req.finish_reason), *usage, "[DONE]")

        def log_message(self, fmt, *args):  # quiet: the access log would flood an evaluation's output
            pass

    return Handler
