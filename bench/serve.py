"""Benchmark: `mgjax serve` under load, driven by the `openai` client as users drive it. Starts the server
(a subprocess, so that the clients do not share its interpreter; a fresh compilation cache), then for each
concurrency sends the same requests (one image and a question each, temperature 0) from that many client
threads: throughput, time to first token and latency percentiles, and whether every answer equals the answer
it got alone (1 client); streamed (a chunk per token, what TTFT is measured on) and as whole answers (the
client parses one reply instead of a chunk per token: about 2 ms of its CPU per request against 7 ms here).
Every request sends the same image: with the server's caches on, all but the first reuse its preprocessed
arrays and its visual tokens (as a chat's later turns do); then the same again on a server started with both
off (`--image-cache 0 --encoder-cache 0`: every request decodes, resizes and encodes its image, as distinct
images would), whose start shows how soon a restarted server, its programs in the compilation cache, is ready.
Last, the floor (`--no-floor` skips it): the same clients against bench/stand_in.py, which computes nothing and
answers every request at once as fast as the server answered one alone: what the driver itself allows here.

  python bench/serve.py                                   # the tiny golden checkpoint, 1, 8 and 32 clients
  python bench/serve.py --ckpt CKPT --clients 1,8 --requests 48 --max-tokens 64 --image-cache off
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.children import ROOT, write_results  # noqa: E402

GOLDEN = ROOT / "tests" / "fixtures" / "mgm_reference" / "llama_vicuna"


def start_server(ckpt: str, slots: int, extra: list[str], cache: str) -> tuple[subprocess.Popen, str, float]:
    """`mgjax serve` on a free port with its compilation cache in `cache`: (process, base URL, seconds until it
    said it was ready)."""
    env = {**{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "MGJAX_COMPILE_CACHE": cache}
    return launch([sys.executable, "-m", "mgjax", "serve", "--ckpt", ckpt, "--port", "0", "--slots", str(slots),
                   *extra], env)


def launch(cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str, float]:
    """A server process started with `cmd`: (process, the base URL it prints once it listens, seconds until
    then)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        found = re.search(r"on (http://\S+/v1)", line)
        if found:
            return proc, found.group(1), time.perf_counter() - t0
    raise SystemExit(f"{' '.join(cmd[1:3])} ended before it was ready (exit {proc.wait()})")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def server_means(url: str) -> dict:
    """The server's own TTFT and latency (sum, count) from its /metrics: from a request's arrival, without the
    clients' side."""
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=60) as r:
        metrics = dict(line.rsplit(" ", 1) for line in r.read().decode().splitlines() if not line.startswith("#"))
    return {k: (float(metrics[f"mgjax_{k}_seconds_sum"]), float(metrics[f"mgjax_{k}_seconds_count"]))
            for k in ("time_to_first_token", "request_latency")}


def run_load(url: str, n: int, clients: int, max_tokens: int, image: str, stream: bool = True) -> dict:
    """`n` requests from `clients` threads (request i asks question i), streamed or not: per-request answers,
    TTFT (first chunk with text; None for whole answers), latency; wall time; the server's mean TTFT and
    latency."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)
    answers, ttft, latency, tokens = [None] * n, [0.0] * n, [0.0] * n, [0] * n

    def ask(i: int) -> None:
        messages = [{"role": "user", "content": [{"type": "text", "text": f"Question {i}: what is in the image?"},
                                                 {"type": "image_url", "image_url": {"url": image}}]}]
        t0 = time.perf_counter()
        reply = client.chat.completions.create(model="mgjax", messages=messages, max_tokens=max_tokens,
                                               stream=stream, temperature=0)
        if not stream:
            latency[i], answers[i] = time.perf_counter() - t0, reply.choices[0].message.content
            tokens[i] = reply.usage.completion_tokens
            return
        parts = []
        for chunk in reply:
            if chunk.choices and chunk.choices[0].delta.content is not None:
                if not parts:
                    ttft[i] = time.perf_counter() - t0
                parts.append(chunk.choices[0].delta.content)
        latency[i], answers[i], tokens[i] = time.perf_counter() - t0, "".join(parts), len(parts)

    errors: list[str] = []

    def worker(k: int) -> None:
        for i in range(k, n, clients):
            try:
                ask(i)
            except Exception as e:  # counted: a lost request is a result too
                errors.append(f"request {i}: {type(e).__name__}: {e}")

    before = server_means(url)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = server_means(url)
    server = {k: (after[k][0] - before[k][0]) / max(after[k][1] - before[k][1], 1) for k in after}
    return {"server_ttft_mean_s": server["time_to_first_token"], "server_latency_mean_s": server["request_latency"],
            "stream": stream, "clients": clients, "requests": n, "wall_s": wall, "requests_per_s": n / wall,
            "tokens_per_s": sum(tokens) / wall, "tokens": sum(tokens),
            "errors": errors,
            "ttft_p50_s": percentile(ttft, 0.5) if stream else None,
            "ttft_p90_s": percentile(ttft, 0.9) if stream else None,
            "latency_p50_s": percentile(latency, 0.5), "latency_p90_s": percentile(latency, 0.9),
            "latency_p99_s": percentile(latency, 0.99), "answers": answers}


def _pass(row: dict) -> str:
    return "stand-in" if row["server"] == "stand-in" else "cached" if row["image_cache"] == "on" else "decoded"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=str(GOLDEN / "MGM-7B-tiny"))
    ap.add_argument("--image", default=str(GOLDEN / "input.jpg"))
    ap.add_argument("--clients", default="1,8,32", help="concurrencies, comma-separated (1 is the baseline)")
    ap.add_argument("--requests", type=int, default=24, help="requests per concurrency (at least the clients)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--server-args", default="", help="more `mgjax serve` arguments")
    ap.add_argument("--image-cache", default="on,off", help="the server's image and encoder caches in each pass: on, "
                    "off or both (on,off: the second start, a restart, is timed)")
    ap.add_argument("--answers", default="streamed,whole", help="streamed, whole or both (comma-separated)")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="then drive bench/stand_in.py the same way: a server that computes nothing, its first token "
                    "and steps as fast as the server's alone (the first pass's 1-client figures), any number at once")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = ap.parse_args(argv)
    modes = args.answers.split(",")
    if not modes or any(m not in ("streamed", "whole") for m in modes):
        raise SystemExit(f"--answers {args.answers!r}: streamed, whole, or both comma-separated")
    levels = sorted({1, *(int(c) for c in args.clients.split(","))})
    image = "data:image/jpeg;base64," + base64.b64encode(Path(args.image).read_bytes()).decode()
    passes = args.image_cache.split(",")
    if not passes or any(p not in ("on", "off") for p in passes):
        raise SystemExit(f"--image-cache {args.image_cache!r}: on, off, or both comma-separated")
    cache = tempfile.mkdtemp(prefix="mgjax-bench-serve-")  # a first start compiles everything
    rows, ready = [], []
    try:
        for cached in passes:
            off = [] if cached == "on" else ["--image-cache", "0", "--encoder-cache", "0"]
            proc, url, ready_s = start_server(args.ckpt, args.slots, [*args.server_args.split(), *off], cache)
            ready.append(ready_s)
            try:
                first = run_load(url, 1, 1, args.max_tokens, image)["latency_p50_s"]  # the fresh server's first
                run_load(url, args.slots, args.slots, args.max_tokens, image)  # untimed: a fresh process's first
                # rounds run slower (measured: 1-client latency p50 64 ms on a fresh server, 41 ms on the next)
                rows += [{"server": "mgjax", "image_cache": cached, "first_latency_s": first,
                          **run_load(url, max(args.requests, c), c, args.max_tokens, image, mode == "streamed")}
                         for mode in modes for c in levels]
            finally:
                proc.terminate()
                proc.wait(timeout=120)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if args.floor:
        alone = rows[0]
        prefill = alone["server_ttft_mean_s"]
        step = (alone["server_latency_mean_s"] - prefill) / max(args.max_tokens - 1, 1)
        proc, url, _ = launch([sys.executable, str(ROOT / "bench" / "stand_in.py"), "--prefill", str(prefill),
                               "--step", str(step)])
        try:
            rows += [{"server": "stand-in", "image_cache": None, "stand_in_prefill_s": prefill, "stand_in_step_s": step,
                      **run_load(url, max(args.requests, c), c, args.max_tokens, image, mode == "streamed")}
                     for mode in modes for c in levels]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    alone = rows[0]["answers"]
    for r in rows:
        answers = r.pop("answers")
        r["equal_to_alone"] = (all(a == alone[i % len(alone)] for i, a in enumerate(answers) if i < len(alone))
                               if r["server"] == "mgjax" else None)
    print(f"mgjax serve {args.ckpt} ({args.slots} slots), ready in {ready[0]:.1f} s (load and compile"
          + (f"; {ready[1]:.1f} s restarted, the programs from its compilation cache" if len(ready) > 1 else "")
          + f"); the first request on the fresh server took {rows[0]['first_latency_s'] * 1e3:.0f} ms; "
          f"{args.max_tokens} tokens per answer, one image")
    ms = lambda x: "-" if x is None else f"{x * 1e3:.0f}ms"  # noqa: E731
    print(f"{'pass':>8}{'answers':>9}{'clients':>8}{'requests':>9}{'wall s':>8}{'req/s':>8}{'tok/s':>8}"
          f"{'TTFT p50':>10}{'p90':>8}{'latency p50':>12}{'p90':>8}{'p99':>8}{'server TTFT':>12}{'latency':>9}  equal")
    for r in rows:
        print(f"{_pass(r):>8}{'streamed' if r['stream'] else 'whole':>9}"
              f"{r['clients']:>8}{r['requests']:>9}{r['wall_s']:>8.2f}{r['requests_per_s']:>8.1f}"
              f"{r['tokens_per_s']:>8.0f}{ms(r['ttft_p50_s']):>10}{ms(r['ttft_p90_s']):>8}"
              f"{ms(r['latency_p50_s']):>12}{ms(r['latency_p90_s']):>8}{ms(r['latency_p99_s']):>8}"
              f"{ms(r['server_ttft_mean_s']):>12}{ms(r['server_latency_mean_s']):>9}"
              f"  {'-' if r['equal_to_alone'] is None else r['equal_to_alone']}"
              + (f"  ({len(r['errors'])} failed)" if r["errors"] else ""))
    for r in rows:
        base = next(b for b in rows if b["clients"] == 1 and _pass(b) == _pass(r) and b["stream"] == r["stream"])
        if r is not base:
            r["speedup_vs_one_by_one"] = r["requests_per_s"] / base["requests_per_s"]
            r["server_ttft_vs_alone"] = r["server_ttft_mean_s"] / base["server_ttft_mean_s"]
            if r["stream"]:
                r["ttft_p50_vs_alone"] = r["ttft_p50_s"] / base["ttft_p50_s"]
            print(f"{_pass(r)}, {'streamed' if r['stream'] else 'whole answers'}, {r['clients']} "
                  f"clients: {r['speedup_vs_one_by_one']:.1f}x the requests/s of one by one"
                  + (f", TTFT p50 {r['ttft_p50_vs_alone']:.1f}x its alone value" if r["stream"] else "")
                  + f", the server's mean TTFT {r['server_ttft_vs_alone']:.1f}x")
    write_results({"ckpt": args.ckpt, "slots": args.slots, "max_tokens": args.max_tokens, "ready_s": ready[0],
                   "ready_restarted_s": ready[1] if len(ready) > 1 else None, "rows": rows,
                   "command": "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:])},
                  args.out, ("jax", "openai"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
