"""Continuous batching: one decode loop over a KV cache of `slots` rows, for `mgjax serve`.

Waiting requests are prefilled into the free rows of the cache as soon as there are any (those of one
length bucket in one call), and join the running batch at the next step; each step decodes one token for
every row (each at its own cache slot and rotary position, `MGM.decode` with a per-row index), and a row
that stops frees its slot at once. Every row carries its own decoding settings (temperature 0 = greedy,
top_k, top_p, seed, stop strings, token budget), so mixed requests share a step; a row gives what its
prompt gives alone through `Pretrained.generate` (the same tokens at temperature 0, and the same samples
from the same seed). Each decoded token is reported with the text it adds (`settled_text`: never half a
character).

Programs: one decode step over all the slots; the vision encoders per number of images (1, 2, 4, ...);
a prefill per (length bucket, number of prompts: 1, 2, 4, ..., images) that takes the images' visual tokens.
An image's visual tokens are kept by its key (the server's digest of the file) in an LRU of `encoder_cache`
bytes: a chat sends its image again with every turn, an evaluation asks several questions of one image. A
text-only prompt runs no encoder. `warm` compiles the step, the encoders and the prefills of the buckets a
text or one-image prompt of up to `warm_text` text tokens uses, before the engine reports ready.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mgjax.data.templates import get_template
from mgjax.errors import MGJaxError
from mgjax.infer.generate import prefill
from mgjax.infer.sampling import next_token
from mgjax.lm.decoder import init_cache
from mgjax.model import IMAGE_TOKEN_INDEX, MGM
from mgjax.pretrained import _stops, _text, length_bucket


@dataclass
class Request:
    """One prompt and its decoding settings; the engine reports to `events` (a queue): ("delta", text) per
    token (a whole answer's request: once, at the end; to `on_delta` instead when set), then ("done", None)
    or ("error", message). `cancel()` frees its slot at the next step."""

    ids: np.ndarray  # int32 [T], -200 at images
    images: np.ndarray
    images_aux: np.ndarray
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stream: bool = True  # report the text of each token (else only the answer, at the end)
    image_keys: tuple = ()  # per image, the key its visual tokens are cached by (its file's digest); () = none
    preprocessed: bool = False  # the images are `Pretrained.preprocess`'s own arrays: their values are not scanned
    events: queue.Queue = field(default_factory=queue.Queue)
    # called with each delta instead of queueing it, on the engine's thread (so it must not block): the server
    # sends a stream's chunks from there, as waking a handler's thread per token costs more than the send
    on_delta: Callable[[str], None] | None = None
    # filled in by the engine
    length: int = 0  # merged prompt tokens
    bucket: int = 0  # the length its prompt is padded (and prefilled) to, `length_bucket`
    text_only: bool = False  # no image placeholder: its (zero) image is not encoded
    stops: tuple = ((), ())  # (token ids, strings), `pretrained._stops`
    decode: "IncrementalDecode | None" = None  # a stream's text so far (its deltas)
    decode_all: "IncrementalDecode | None" = None  # the same with special tokens (its stop strings), if it has any
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # what has been sent as deltas
    answer: str | None = None  # the finished answer, as `Pretrained.generate` gives it
    finish_reason: str | None = None
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


def _choose(logits, seeds, steps, temperature, top_k, top_p):
    """int32 [B]: each row's next token from float32 logits [B, V] with its own settings (temperature 0 =
    greedy) and key: `Pretrained.generate`'s key for that row alone (row 0 of a split of key(seed), folded
    with the token's step)."""
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.split(jax.random.key(s), 1)[0], i))(seeds, steps)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = temperature > 0

    def sample():
        t = jnp.where(sampling, temperature, 1.0)[:, None]
        return next_token(logits, keys, t, top_k[:, None], top_p[:, None], greedy=False)

    sampled = jax.lax.cond(jnp.any(sampling), sample, lambda: greedy)  # an all-greedy step skips the sort
    return jnp.where(sampling, sampled, greedy)


class BytesLRU:
    """Values by key, the least recently used dropped once their bytes pass `max_bytes` (a value larger than
    that is not kept); counts hits and misses. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self._entries: collections.OrderedDict = collections.OrderedDict()  # key -> (value, bytes)
        self._lock = threading.Lock()

    def get(self, key):
        """The value kept for `key`, or None."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found[0]

    def put(self, key, value, nbytes: int) -> None:
        with self._lock:
            if nbytes > self.max_bytes or key in self._entries:
                return
            self._entries[key] = value, nbytes
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                self.bytes -= self._entries.popitem(last=False)[1][1]


def _write_row(big, small, row):
    """A prefilled cache leaf [(L,) 1, P, ...] written into row `row` of the engine's [(L,) N, S, ...] at
    slots 0 .. P - 1."""
    lead = big.ndim - 4  # a scanned cache's layer axis comes first
    start = (0,) * lead + (row, 0, 0, 0)
    return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), start)


class Engine:
    """The slots, the waiting requests and the loop (a thread: `start`, `stop`)."""

    def __init__(self, model, slots: int = 8, context: int | None = None, warm_text: int = 128,
                 encoder_cache: int = 256 << 20):
        if model.mesh is not None:
            raise MGJaxError("the serving engine runs on one device: load the model without a mesh")
        c = model.config
        self.model, self.slots, self.warm_text = model, slots, warm_text
        self.context = context or c.max_length  # cache slots per row: prompt bucket + answer
        if self.context < 64 + 1:
            raise MGJaxError(f"context {self.context}: needs room for a prompt bucket (64) and an answer")
        tok = model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        # SentencePiece's byte-fallback tokens (<0xE2>): the decoder turns a run of them into a character, or
        # into one U+FFFD per byte once the run proves invalid, so a trailing run is not sent before it ends
        self.byte_tokens = frozenset(i for t, i in tok.get_vocab().items() if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t))
        self.decode_breaks = self.byte_tokens | frozenset(tok.all_special_ids)
        self.template_stops = get_template(c.template).stop
        self.ready = threading.Event()
        self.rows: list[Request | None] = [None] * slots
        self.waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._prefills: dict = {}
        self._encodes: dict = {}  # number of images -> compiled encoders
        self._step = jax.jit(self._step_fn, donate_argnums=1)
        self._encode = jax.jit(self._encode_fn)
        self.encoded = BytesLRU(encoder_cache)  # image key -> its visual tokens [tokens_per_image, H]
        tokens = jax.eval_shape(self._encode, model.params, *model.zero_images())[0]
        self._no_image = jnp.zeros(tokens.shape, tokens.dtype)  # what a text-only prompt consumes, unused
        # per row, on the host: the next input token, its rotary position and cache slot, settings, steps done
        self.token = np.zeros(slots, np.int32)
        self.position = np.zeros(slots, np.int32)
        self.index = np.zeros(slots, np.int32)
        self.seed = np.zeros(slots, np.uint32)
        self.step = np.zeros(slots, np.int32)
        self.temperature = np.zeros(slots, np.float32)
        self.top_k = np.zeros(slots, np.int32)
        self.top_p = np.ones(slots, np.float32)
        self.cache = init_cache(c.lm, slots, self.context, model.module.dtype)
        self.valid = jnp.zeros((slots, self.context), bool)
        self.stats = {"tokens": 0, "steps": 0}
        self.on_token = None  # called (time) per token decoded, for the server's metrics

    # --- programs --------------------------------------------------------------------------------------

    def _step_fn(self, params, cache, valid, tokens, positions, index, seeds, steps, temperature, top_k, top_p):
        logits, cache = self.model.module.apply({"params": params}, tokens, positions, valid, cache, index,
                                                method=MGM.decode)
        return _choose(logits, seeds, steps, temperature, top_k, top_p), cache

    def _encode_fn(self, params, images, images_aux):
        """n images -> their visual tokens, an array [tokens_per_image, H] each."""
        return tuple(self.model.module.apply({"params": params}, images, images_aux, method=MGM.encode_images))

    def _prefill_program(self, bucket: int):
        module, context = self.model.module, self.context

        def run(params, cache, valid, ids, image_tokens, mask, rows, seeds, temperature, top_k, top_p):
            """k prompts [k, bucket] and their images' visual tokens (n arrays [tokens_per_image, H]) into cache
            rows `rows` int [k]: their first tokens and positions [k]."""
            logits, small, small_valid, position = prefill(module, params, ids, None, None, mask, bucket, 0,
                                                           jnp.stack(image_tokens))
            small_valid = jnp.concatenate([small_valid, jnp.ones((len(rows), context - bucket), bool)], axis=1)
            for i in range(len(rows)):  # k is static: a few dynamic-update-slices in place
                cache = jax.tree.map(lambda big, s: _write_row(big, s[..., i:i + 1, :, :, :], rows[i]), cache, small)
                valid = jax.lax.dynamic_update_slice(valid, small_valid[i:i + 1], (rows[i], 0))
            token = _choose(logits, seeds, jnp.zeros_like(rows), temperature, top_k, top_p)
            return token, position, cache, valid

        return jax.jit(run, donate_argnums=(1, 2))

    def _prefill_inputs(self, reqs: list[Request], rows: list[int], image_tokens: list[tuple]) -> tuple[tuple, tuple]:
        """The program key and arguments that prefill requests of one length bucket, with their images' visual
        tokens, into `rows` together, the batch padded to a power of two (so that a few programs serve every
        count) by repeating the last request into the last row."""
        bucket = reqs[0].bucket
        k = 1 << (len(reqs) - 1).bit_length()
        pad = k - len(reqs)
        reqs, rows = reqs + [reqs[-1]] * pad, rows + [rows[-1]] * pad
        image_tokens = sum(image_tokens + image_tokens[-1:] * pad, ())
        # left-padded to the bucket, so that one program serves every prompt of the bucket
        ids, mask = np.full((k, bucket), self.pad_id, np.int32), np.zeros((k, bucket), np.int32)
        for i, r in enumerate(reqs):
            ids[i, bucket - len(r.ids):], mask[i, bucket - len(r.ids):] = r.ids, 1
        settings = [np.asarray([getattr(r, name) for r in reqs], dtype) for name, dtype in
                    (("seed", np.uint32), ("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32))]
        return (bucket, k, len(image_tokens)), (self.model.params, self.cache, self.valid, ids, image_tokens, mask,
                                                np.asarray(rows, np.int32), *settings)

    def _image_tokens(self, reqs: list[Request]) -> list[tuple]:
        """Each request's visual tokens, an array per image it consumes (a text-only prompt consumes one,
        unused): kept ones from the cache, the others encoded together now, an image that comes twice (one key)
        once (their count padded to a power of two by repeating the last; a new count compiles its encoders
        here)."""
        out, todo, pending = [], [], {}  # todo: (request, image, places [(row, index)]); pending: key -> todo's
        keyed = self.encoded.max_bytes > 0  # a cache of 0 bytes turns reuse off, within a group too
        for r in reqs:
            if r.text_only:
                out.append([self._no_image])
                continue
            row = []
            for i in range(len(r.images)):
                key = r.image_keys[i] if keyed and r.image_keys else None
                found = None if key is None else self.encoded.get(key)
                if found is None:
                    at = pending.get(key) if key is not None else None
                    if at is None:
                        at = len(todo)
                        todo.append((r, i, []))
                        if key is not None:
                            pending[key] = at
                    todo[at][2].append((row, len(row)))
                row.append(found)
            out.append(row)
        if todo:
            n = 1 << (len(todo) - 1).bit_length()
            picks = [(r, i) for r, i, _ in todo]
            picks += picks[-1:] * (n - len(picks))
            args = (self.model.params, np.stack([r.images[i] for r, i in picks]),
                    np.stack([r.images_aux[i] for r, i in picks]))
            if n not in self._encodes:
                self._encodes[n] = self._encode.lower(*args).compile()
            for (r, i, places), tokens in zip(todo, self._encodes[n](*args)):
                for row, j in places:
                    row[j] = tokens
                if keyed and r.image_keys:
                    self.encoded.put(r.image_keys[i], tokens, tokens.nbytes)
        return [tuple(row) for row in out]

    def _prefill(self, reqs: list[Request], rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Prefills requests of one length bucket into `rows` together: (first tokens, next positions)
        [len(reqs)]. A new (bucket, batch, images) shape compiles its program here."""
        key, args = self._prefill_inputs(reqs, rows, self._image_tokens(reqs))
        if key not in self._prefills:
            self._prefills[key] = self._prefill_program(key[0]).lower(*args).compile()
        token, position, self.cache, self.valid = self._prefills[key](*args)
        return np.asarray(token), np.asarray(position)

    # --- requests --------------------------------------------------------------------------------------

    def check(self, req: Request) -> None:
        """Raises MGJaxError (the client's 400) for a request the engine cannot run; sets its length and
        bucket."""
        m = self.model
        if req.max_tokens < 1 or req.top_k < 0 or not 0.0 < req.top_p <= 1.0 or req.temperature < 0:
            raise MGJaxError(f"max_tokens {req.max_tokens} must be >= 1, top_k {req.top_k} >= 0, top_p {req.top_p} "
                             f"in (0, 1], temperature {req.temperature} >= 0")
        if not 0 <= req.seed < 2**32:
            raise MGJaxError(f"seed {req.seed} must be in 0 .. 2**32 - 1")
        ids, _, req.images, req.images_aux, req.length = m._check_inputs(
            req.ids[None], req.images, req.images_aux, None, truncate=False, check_values=not req.preprocessed)
        req.ids, req.bucket = ids[0], length_bucket(req.length, m.config.max_length)
        req.text_only = not (req.ids == IMAGE_TOKEN_INDEX).any()
        if req.image_keys and len(req.image_keys) != len(req.images):
            raise MGJaxError(f"{len(req.image_keys)} image keys for {len(req.images)} images")
        if req.bucket + req.max_tokens > self.context:
            raise MGJaxError(f"the prompt ({req.length} tokens with its images, compiled as {req.bucket}) and "
                             f"max_tokens {req.max_tokens} do not fit the server's context of {self.context} tokens "
                             f"per request: ask for at most {self.context - req.bucket} tokens (or start the server "
                             "with a larger --context)")

    def submit(self, req: Request) -> None:
        self.check(req)
        req.stops = _stops(self.model.tokenizer, (*self.template_stops, *req.stop))
        if req.stream:
            req.decode = IncrementalDecode(self.model.tokenizer, self.decode_breaks)
        if req.stops[1]:
            req.decode_all = IncrementalDecode(self.model.tokenizer, self.decode_breaks, skip_special_tokens=False)
        with self._wake:
            self.waiting.append(req)
            self._wake.notify()

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    # --- the loop --------------------------------------------------------------------------------------

    def start(self, warm: bool = True) -> "Engine":
        self._running = True
        self._thread = threading.Thread(target=self._loop, args=(warm,), daemon=True, name="mgjax-engine")
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def warm(self) -> int:
        """Compiles the step, the encoders and the prefills (of 1, 2, 4, ... prompts) of the buckets of a text
        prompt or a one-image prompt of up to `warm_text` text tokens, and runs each once (a program's first run
        costs several runs: 37-68 ms against 2.5-9 ms for the tiny checkpoint's prefills on a CPU) on rows that
        stay free; returns the number of programs. Tracing is Python's, one program at a time; XLA compiles
        them side by side, a thread per core (up to 8)."""
        c = self.model.config
        images, images_aux = self.model.zero_images()
        merged = {*range(1, self.warm_text + 1), *range(c.tokens_per_image, c.tokens_per_image + self.warm_text)}
        buckets = sorted(b for b in {length_bucket(n, c.max_length) for n in merged} if b < self.context)
        counts = [1 << i for i in range((2 * self.slots - 1).bit_length())]  # what the loop may prefill together
        lowered, runs = {"step": self._step.lower(*self._step_inputs())}, []
        for n in counts:
            lowered["encode", n] = self._encode.lower(self.model.params, *self.model.zero_images(n))
        for bucket in buckets:  # a prompt of that merged length: text only, or one image and text
            ids = np.full(bucket if bucket <= c.tokens_per_image else bucket - c.tokens_per_image + 1, self.pad_id,
                          np.int32)
            if bucket > c.tokens_per_image:
                ids[0] = IMAGE_TOKEN_INDEX
            warm = Request(ids, images, images_aux, 1, length=bucket, bucket=bucket,
                           text_only=bucket <= c.tokens_per_image)
            for k in counts:
                runs.append(([warm] * k, [min(i, self.slots - 1) for i in range(k)]))
                key, args = self._prefill_inputs(*runs[-1], [(self._no_image,)] * k)
                lowered[key] = self._prefill_program(bucket).lower(*args)
        with concurrent.futures.ThreadPoolExecutor(min(os.cpu_count() or 1, 8)) as pool:
            compiled = dict(zip(lowered, pool.map(lambda program: program.compile(), lowered.values())))
        self._step = compiled.pop("step")
        self._encodes.update({n: compiled.pop(("encode", n)) for n in counts})
        self._prefills.update(compiled)
        for reqs, rows in runs:
            self._prefill(reqs, rows)
        self._decode()
        self.valid = jnp.zeros_like(self.valid)
        return len(self._prefills) + len(self._encodes) + 1

    def _loop(self, warm: bool) -> None:
        if warm:
            self.warm()
        self.ready.set()
        while True:
            with self._wake:
                while self._running and not self.waiting and not self.active:
                    self._wake.wait()
                if not self._running:
                    break
            self._admit()
            if self.active:
                self._advance(self._decode())
        for req in [*self.rows, *self.waiting]:
            if req is not None:
                req.events.put(("error", "the server stopped"))

    def _admit(self) -> None:
        """Prefills waiting requests into the free rows, those of one length bucket together; each gets its
        first token."""
        free = [row for row in range(self.slots) if self.rows[row] is None]
        with self._wake:
            taken = []
            while self.waiting and len(taken) < len(free):
                req = self.waiting.popleft()
                if not req.cancelled.is_set():
                    taken.append(req)
        groups: dict[int, list[Request]] = collections.defaultdict(list)
        for req in taken:
            groups[req.bucket].append(req)
        for reqs in groups.values():
            rows, free = free[:len(reqs)], free[len(reqs):]
            try:
                tokens, positions = self._prefill(reqs, rows)
            except Exception as e:  # never take the loop down; the clients hear why
                for req in reqs:
                    req.events.put(("error", f"generation failed ({type(e).__name__}: {e})"))
                free += rows
                continue
            for req, row, token, position in zip(reqs, rows, tokens, positions):
                self.rows[row] = req
                self.position[row], self.index[row] = position, req.bucket
                self.seed[row], self.step[row] = np.uint32(req.seed), 1
                self.temperature[row], self.top_k[row], self.top_p[row] = req.temperature, req.top_k, req.top_p
                self._emit(row, int(token))

    def _step_inputs(self) -> tuple:
        return (self.model.params, self.cache, self.valid, self.token, self.position, self.index, self.seed,
                self.step, self.temperature, self.top_k, self.top_p)

    def _decode(self) -> np.ndarray:
        out, self.cache = self._step(*self._step_inputs())
        self.stats["steps"] += 1
        return np.asarray(out)

    def _advance(self, tokens: np.ndarray) -> None:
        for row, req in enumerate(self.rows):
            if req is None:
                continue
            self.position[row] += 1
            self.index[row] += 1
            self.step[row] += 1
            self._emit(row, int(tokens[row]))

    def _emit(self, row: int, token: int) -> None:
        """Records a row's new token, sends the text it adds, and frees the row when the answer ends."""
        req = self.rows[row]
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
        req.tokens.append(token)
        self.token[row] = token
        self.stats["tokens"] += 1
        if self.on_token is not None:
            self.on_token(now)
        token_stops, text_stops = req.stops
        tok = self.model.tokenizer
        stopped = token in token_stops
        if text_stops and not stopped:
            text = req.decode_all(req.tokens)
            stopped = any(s in text for s in text_stops)
        if stopped:
            req.finish_reason = "stop"
        elif len(req.tokens) == req.max_tokens:
            req.finish_reason = "length"
        if req.finish_reason is not None:
            req.answer = _text(tok, np.asarray(req.tokens), (*self.template_stops, *req.stop))
            self._send(req, req.answer)
            req.events.put(("done", None))
            self.rows[row] = None
        elif req.cancelled.is_set():
            self.rows[row] = None
        elif req.stream:  # a whole answer's waiter is not woken per token
            self._send(req, settled_text(req.decode, req.tokens, self.byte_tokens, text_stops))

    @staticmethod
    def _send(req: Request, text: str) -> None:
        """One delta per token: the text it settles (often all of its own, "" while it is held back)."""
        delta = text[len(req.text):] if text.startswith(req.text) else ""
        req.text += delta
        if req.on_delta is not None:
            req.on_delta(delta)
        else:
            req.events.put(("delta", delta))


class IncrementalDecode:
    """`tokenizer.decode(ids, skip_special_tokens=...)` of a growing answer, in time that does not grow with
    it (decoding the whole answer at every token made a 1024-token answer's last token cost 0.33 ms per row with
    the tiny Llama tokenizer, 0.64 ms at 2000): the text of an anchor prefix, decoded whole, plus what the
    `window` tokens before the anchor and the later ones decode to past those tokens' own text. Every family's
    decoder is local (SentencePiece pieces, byte-level BPE, words; only the first piece's space is dropped, the
    same in both decodes) but for bytes: SentencePiece's byte-fallback tokens decode a run together (one U+FFFD
    per byte unless the whole run is valid UTF-8; skipped special tokens join the runs beside them), so the
    anchor is only taken after a token of neither kind (`breaks`), and not where the text ends in U+FFFD (a
    byte-level vocabulary's character whose bytes straddle it). There, where the longer text does not start
    with the window's text (a decoder less local than these), and once the tail passes `every` tokens, the
    whole answer is decoded and becomes the anchor."""

    def __init__(self, tokenizer, breaks: frozenset = frozenset(), window: int = 8, every: int = 64,
                 skip_special_tokens: bool = True):
        self.tokenizer, self.breaks, self.window, self.every = tokenizer, breaks, window, every
        self.skip_special_tokens = skip_special_tokens
        self.anchor, self.text, self.head = 0, "", ""  # tokens decoded whole, their text, the window's text
        self.extends = False  # whether text past the anchor is found from the window

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def __call__(self, ids: list[int]) -> str:
        n, k = len(ids), self.anchor
        if self.extends and k <= n <= k + self.every:
            tail = self._decode(ids[k - self.window:])
            if tail.startswith(self.head):
                return self.text + tail[len(self.head):]
        self.text = self._decode(ids)
        self.anchor, self.head = n, self._decode(ids[max(n - self.window, 0):n])
        self.extends = n >= self.window and ids[n - 1] not in self.breaks and not self.text.endswith("\ufffd")
        return self.text


def settled_text(decode, tokens: list[int], byte_tokens: frozenset, text_stops: tuple[str, ...]) -> str:
    """The part of an unfinished answer's text that later tokens cannot change: decoded (`decode`: token ids ->
    text, special tokens skipped) without its trailing run of byte-fallback tokens, and without what may still
    become a stop string, an incomplete UTF-8 character of a byte-level vocabulary (decoded as U+FFFD), or
    whitespace the finished answer strips."""
    run = len(tokens)
    while run and tokens[run - 1] in byte_tokens:
        run -= 1
    text = decode(tokens[:run])
    held = max((k for s in text_stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - held].rstrip("\ufffd").strip()
