"""A stand-in for `mgjax serve` that computes nothing: bench/serve.py's floor. It speaks the server's wire format
(HTTP/1.0, a connection per request; the same chat.completion and chunk fields, the role in the first delta,
then the finish reason and [DONE]; /metrics' time-to-first-token and latency sums and counts) and gives every
request its first token `--prefill` seconds after it arrived and the next every `--step` seconds, all requests
at once: an unbounded batch whose steps take no CPU. Driven like the server, the clients' TTFT and throughput
are then what the driver itself allows on this machine with a server as fast as one request alone.

  python bench/stand_in.py --port 0 --prefill 0.0034 --step 0.001    # prints "on http://HOST:PORT/v1"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field


@dataclass
class _Answer:
    writer: asyncio.StreamWriter
    tokens: int
    stream: bool
    arrived: float
    due: float  # when its next token is
    sent: int = 0  # tokens due so far (the clock's count)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class StandIn:
    """The I/O on an asyncio loop; one clock thread says when each answer's next token is due (a thread, as
    the loop's timers round to milliseconds)."""

    def __init__(self, prefill: float, step: float):
        self.prefill, self.step = prefill, step
        self.answers: list[_Answer] = []
        self.sums = {"time_to_first_token": [0.0, 0], "request_latency": [0.0, 0]}
        self._wake = threading.Condition()
        self.loop: asyncio.AbstractEventLoop | None = None

    # --- the clock -----------------------------------------------------------------------------------

    def clock(self) -> None:
        with self._wake:  # held but while waiting, so that no arrival's notify is missed
            while True:
                while not self.answers:
                    self._wake.wait()
                now = time.perf_counter()
                due = []
                for a in self.answers:
                    if a.due <= now:
                        a.sent += 1
                        a.due += self.step
                        due.append((a, a.sent))  # the loop may run this after the next tick: its own count
                self.answers = [a for a in self.answers if a.sent < a.tokens]
                if due:
                    self.loop.call_soon_threadsafe(self._send, due, now)
                soonest = min((a.due for a in self.answers), default=now)
                self._wake.wait(max(soonest - time.perf_counter(), 0))

    def _send(self, due: list[tuple[_Answer, int]], now: float) -> None:
        for a, sent in due:
            if sent == 1:
                self._observe("time_to_first_token", now - a.arrived)
            if a.stream:
                delta = {"role": "assistant", "content": " word"} if sent == 1 else {"content": " word"}
                a.writer.write(_event(_chunk(delta, None)))
            if sent == a.tokens:
                self._observe("request_latency", now - a.arrived)
                if a.stream:
                    a.writer.write(_event(_chunk({}, "length")) + b"data: [DONE]\n\n")
                else:
                    a.writer.write(_response(json.dumps(_completion(a.tokens)).encode(), "application/json"))
                a.done.set()

    def _observe(self, name: str, seconds: float) -> None:
        self.sums[name][0] += seconds
        self.sums[name][1] += 1

    # --- HTTP ------------------------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            arrived = time.perf_counter()
            method, path = head[0].split()[:2]
            length = next((int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:")), 0)
            body = await reader.readexactly(length)
            if method == "GET" and path.rstrip("/") == "/metrics":
                text = "".join(f"mgjax_{k}_seconds_sum {s}\nmgjax_{k}_seconds_count {n}\n"
                               for k, (s, n) in self.sums.items())
                writer.write(_response(text.encode(), "text/plain; version=0.0.4"))
            else:
                request = json.loads(body)
                a = _Answer(writer, max(int(request["max_tokens"]), 1), bool(request.get("stream")), arrived,
                            arrived + self.prefill)
                if a.stream:
                    writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Cache-Control: no-cache\r\n\r\n")
                with self._wake:
                    self.answers.append(a)
                    self._wake.notify()
                await a.done.wait()
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def serve(self, host: str, port: int) -> None:
        self.loop = asyncio.get_running_loop()
        threading.Thread(target=self.clock, daemon=True).start()
        server = await asyncio.start_server(self.handle, host, port, backlog=1024)
        print(f"stand-in on http://{host}:{server.sockets[0].getsockname()[1]}/v1", flush=True)
        async with server:
            await server.serve_forever()


def _chunk(delta: dict, finish: str | None) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": "stand-in", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _completion(tokens: int) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": "stand-in", "choices": [{"index": 0, "message": {"role": "assistant", "content": " word" * tokens},
                                              "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}}


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _response(data: bytes, content_type: str) -> bytes:
    return (f"HTTP/1.0 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--prefill", type=float, required=True, help="seconds from a request's arrival to its first token")
    ap.add_argument("--step", type=float, required=True, help="seconds between an answer's tokens")
    args = ap.parse_args(argv)
    asyncio.run(StandIn(args.prefill, args.step).serve(args.host, args.port))


if __name__ == "__main__":
    main()
