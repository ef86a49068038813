"""Benchmark: mgjax generation (`Pretrained.generate`: one jitted program, prefill + KV-cached decode loop),
per config and batch size, next to HF transformers' PyTorch `generate` for the same LLM shape.

Each question is one image + a text prompt of --prompt-tokens ids (bos, the image placeholder, random
words), so its merged length is prompt-tokens - 1 + tokens_per_image (100m: 40 - 1 + 576 = 615; mgjax
compiles it at its length bucket, `mgjax.pretrained.length_bucket`: 768). Greedy decoding of
--new-tokens new tokens per question. The model has random weights (`init_params`) and a word-level
tokenizer of the model's vocabulary ("w3" .. "w<V-1>" after <s>, <unk>) whose eos "</s>" is one id past
the model's vocabulary: it is still a stop id of the compiled program (checked every step, as with a
real checkpoint), but random logits can never pick it, so every row runs the full budget; the run
checks that every row generated exactly --new-tokens tokens (the `new` column) and counts only those.

Columns, per config x framework x batch B (B questions in one `generate` call):

  first s       wall time of the first call (jax: trace + compile + one run; torch: one run)
  compile s     first s - wall s (jax only): what the first call costs on top of a warm one
  wall s        median over --repeats calls of one `generate` of B questions x N new tokens (after the
                first call; results copied to the host, so the work is finished)
  questions/s   B / wall s
  tokens/s      B x N / wall s: generated tokens per second, end to end (prefill included)
  decode s/step (wall s(N) - wall s(S)) / (N - S), S = the short budget (N/2 + 1 within the same
                compiled program: the cache room is a power of two >= N, so N and S share it), medians
                of the same number of calls: one decode step of the whole batch, prefill differenced out
  decode tok/s  B / decode s/step: decode-only tokens per second
  prefill s     wall s - (N - 1) x decode s/step: the towers, the prompt pass and the first token
  new           tokens generated per row (every row; checked == N)
  recompiles    jax: compiled programs in the jitted function's cache beyond the first (should be 0:
                S and N run the same program)
  load          the machine's 1-minute load average when the case started (other work skews the times;
                the run has --repeats calls per budget, no more)

A second table breaks each mgjax case down (the batch grown to generate's power-of-two bucket, as
`Pretrained.generate` runs it; JSON keys in brackets):

  gen compile s trace + lower + XLA compile of the generate program during the first call, summed from
                jax.monitoring's compile duration events [generate_compile_s; XLA alone: generate_xla_compile_s]
  enc s         median of --repeats calls of `MGM.encode_images` (CLIP, ConvNeXt, patch info mining,
                projector) jitted alone, after one warm-up [encode_s, encode_times_s]
  enc comp s    its `.lower().compile()` time [encode_compile_s]
  enc GFLOP     XLA's FLOP count of that compiled program (`cost_analysis()`, read by bench/train.py's
                `_flops`) [encode_flops; per second: encode_flops_per_s]
  enc MFU       encode_flops_per_s / the float32 matmul ceiling [encode_mfu]
  pf s, pf comp s, pf GFLOP, pf MFU   the same for the prompt pass: `MGM.prefill` (splice, the LLM over the
                bucket's positions into a fresh KV cache with generate's room, the last token's logits) with
                its `encode_images` answered by encode's output, so the towers count once
                [prefill_pass_s, _times_s, _compile_s, _flops, _flops_per_s, _mfu]; its greedy token is
                checked against generate's first one [prefill_first_token_matches]. The `prefill s` column
                above is different: differenced out of generate's wall time, towers and first token included.
  decode tok/s  as above
  bound tok/s   B x copy bandwidth / bytes one decode step must read: the float32 LLM weights (less an untied
                input table, of which a step reads B rows) and the whole KV cache [decode_bound_tokens_per_s,
                decode_bytes_per_step]
  of bound      decode tok/s / bound tok/s [decode_bandwidth_util]

The float32 matmul ceiling (MFU's denominator) is bench/train.py's `child_matmul`, measured once here, or
taken from a train.py JSON (--ceiling, as `python -m bench` does) when that one was measured in float32; the
copy bandwidth is a jitted in-place x + 1 over 256 MB (CPU; 1 GiB on an accelerator), best of 5: what XLA
itself streams, not a vendor figure. The bound assumes the step is bandwidth-bound: it means most for 100m
(~240 MB of weights + ~33 MB of cache per row); tiny's ~2 MB step is bound by per-step overhead instead
(and, fitting in the CPU's caches, could in principle beat a DRAM bound).
Both sit in the JSON's top-level matmul_ceiling and copy_bandwidth.

The PyTorch reference is HF transformers' `LlamaForCausalLM` built from a LlamaConfig of the config's LLM
(hidden, layers, heads, KV heads, head_dim, intermediate, vocab, RoPE theta; random weights, float32,
SDPA attention, `torch.set_num_threads(os.cpu_count())`), `model.generate(ids, max_new_tokens=N,
min_new_tokens=N, do_sample=False)` on random TEXT prompts of the merged length (615 for 100m): HF's
Llama has no vision towers, so its rows do no image encoding and prefill exactly the merged length,
while mgjax encodes the images (CLIP + ConvNeXt + mining) and prefills the padded bucket. Its
"decode tok/s" is measured the same way (N vs S new tokens).

Each case runs in its own child process (one framework at a time on the machine).
Configs: `tiny` is the demo model (`mgjax.train.demo.DEMO_CONFIG`, 16 visual tokens, vocab 128); `100m`
is `bench/train.py`'s ~112M-parameter config with MGM-7B's tower structure (576 visual tokens, a Llama
decoder with a 32000 vocabulary).

  python bench/generate.py                                  # tiny and 100m, B = 1 and 8 (2-core CPU: ~20 min)
  python bench/generate.py --configs tiny                   # tiny only (2-core CPU: ~2 min)
  python bench/generate.py --configs 100m --batch-sizes 1,8,32 --repeats 3   # + batch 32 (2-core CPU: ~40 min)
  python bench/generate.py --configs tiny --no-torch --matmul-size 1024   # quick look (smaller ceiling matmul)

Results go to bench/results/generate.json (and a table on stdout).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# bench/, the script's folder, is on sys.path
from children import ROOT, child, device_info, run_child, timed, write_results
from train import _flops, child_matmul, hf_llama_config, matmul_spec

RESULTS = ROOT / "bench" / "results" / "generate.json"
SPECIAL = ("<s>", "<unk>")  # ids 0, 1; words w2 .. w<V-1>; eos "</s>" = V (outside the model's vocabulary)


def model_config(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    from train import model_config as train_config  # the same configs as the training benchmark

    return train_config(name)


def short_budget(n: int) -> int:
    """S: the number of new tokens timed against N to difference out the prefill, in N's compiled program
    (`mgjax.pretrained._budget`: the cache room is a power of two >= max(16, N))."""
    room = max(16, 1 << (n - 1).bit_length())
    s = room // 2 + 1
    return s if s < n else max(1, n // 2)


# --- child processes -------------------------------------------------------------------------------

def save_tokenizer(vocab_size: int, folder: Path) -> int:
    """A word-level tokenizer with an id for every model token and eos one past them; returns eos's id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(len(SPECIAL), vocab_size)]
    vocab = {t: i for i, t in enumerate((*SPECIAL, *words, "</s>"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return vocab["</s>"]


def _prompts(config, rows: int, prompt_tokens: int, seed: int = 0):
    """rows x (bos, image placeholder, prompt_tokens - 2 random words) ids, their images (in range)."""
    import numpy as np

    from mgjax.config import IMAGE_TOKEN_INDEX

    rng = np.random.default_rng(seed)
    ids = rng.integers(len(SPECIAL), config.lm.vocab_size, (rows, prompt_tokens)).astype(np.int32)
    ids[:, 0], ids[:, 1] = 0, IMAGE_TOKEN_INDEX
    s, sa = config.image_size, config.image_size_aux
    views = () if config.num_views == 1 else (config.num_views,)
    images = np.clip(rng.standard_normal((rows, *views, s, s, 3)), -1.8, 2.2).astype(np.float32)
    images_aux = np.clip(rng.standard_normal((rows, sa, sa, 3)), -1.8, 2.2).astype(np.float32)
    return ids, images, images_aux


def _generated(token_ids, stop_ids, n: int) -> list[int]:
    """Tokens each row generated: up to and including its first stop id, else all n."""
    import numpy as np

    out = []
    for row in np.asarray(token_ids):
        hits = np.flatnonzero(np.isin(row, list(stop_ids)))
        out.append(int(hits[0]) + 1 if len(hits) else n)
    return out


# jax.monitoring's duration events of one compilation: tracing, lowering to StableHLO, XLA's compile
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "xla"}


def _compile_log() -> list[tuple[str, float]]:
    """A list that collects (trace | lower | xla, seconds) of every compilation in this process from now
    on: the generate program is compiled inside `Pretrained.generate`, where no `.lower()` can be timed."""
    import jax

    log = []

    def listen(event: str, seconds: float, **_):
        if event in COMPILE_EVENTS:
            log.append((COMPILE_EVENTS[event], seconds))

    jax.monitoring.register_event_duration_secs_listener(listen)
    return log


def _phase(fn, args: tuple, calls: int):
    """jax.jit(fn) compiled ahead of time for `args`, run once untimed and `calls` times timed:
    (its output, {s: median, times_s, compile_s: lower + compile, flops: XLA's count of the program})."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))
    times = timed(lambda: jax.block_until_ready(compiled(*args)), calls)
    return out, {"s": statistics.median(times), "times_s": times, "compile_s": compile_s,
                 "flops": _flops(compiled.cost_analysis())}


def _phases(module, params, inputs: tuple, length: int, room: int, calls: int) -> tuple[dict, tuple]:
    """The two halves of the generate program's prefill, each its own program on the same padded batch
    `inputs` (ids int32 [B, T], mask [B, T], images [B, h, w, 3], images_aux [B, S, S, 3]):

      encode   `MGM.encode_images`: both towers, patch info mining, projector -> [B, tokens_per_image, H]
      prefill  `mgjax.infer.generate.prefill` (`MGM.prefill`: splice, the LLM's pass over the `length`
               merged positions into a cache of length + `room` slots, the last token's logits) given
               encode's output as its image_embeds, so the towers are not counted twice

    Returns ({"encode_*", "prefill_pass_*" keys}, prefill's output (logits [B, V], cache, valid, position))."""
    from mgjax.infer.generate import prefill
    from mgjax.model import MGM

    ids, mask, images, images_aux = inputs
    embeds, enc = _phase(lambda p, im, aux: module.apply({"params": p}, im, aux, method=MGM.encode_images),
                         (params, images, images_aux), calls)
    out, pf = _phase(lambda p, ids, mask, embeds: prefill(module, p, ids, None, None, mask, length, room, embeds),
                     (params, ids, mask, embeds), calls)
    return {**{f"encode_{k}": v for k, v in enc.items()}, **{f"prefill_pass_{k}": v for k, v in pf.items()}}, out


def _decode_bytes(params, cache, tied: bool) -> int:
    """Bytes one decode step must read at least: the LLM's weights (an untied input-embedding table only
    gives B rows, so it is left out) and the whole KV cache (each step attends over all its slots)."""
    import jax

    llm = dict(params["llm"])
    if not tied:
        llm.pop("embed_tokens")
    return sum(x.nbytes for x in jax.tree.leaves((llm, cache)))


def child_jax(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mgjax.model import MGM, init_params, merged_lengths
    from mgjax.pretrained import Pretrained, _budget, length_bucket

    compiles = _compile_log()
    config = model_config(spec["config"])
    b, n, s = spec["batch"], spec["new_tokens"], spec["short"]
    module = MGM(config, dtype=jnp.float32, param_dtype=jnp.float32)
    with tempfile.TemporaryDirectory(prefix="mgjax-genbench-") as tmp:
        eos = save_tokenizer(config.lm.vocab_size, Path(tmp))
        t0 = time.perf_counter()
        params = jax.block_until_ready(init_params(module, jax.random.key(0)))
        init_s = time.perf_counter() - t0
        model = Pretrained(config, params, module, Path(tmp))
        model.tokenizer  # noqa: B018 (loaded before timing)
        ids, images, images_aux = _prompts(config, b, spec["prompt_tokens"])
        merged = int(merged_lengths(ids, np.ones_like(ids), config.tokens_per_image).max())
        gen = lambda k: model.generate(ids, images, images_aux, max_new_tokens=k, stop=())  # noqa: E731

        t0, logged = time.perf_counter(), len(compiles)
        first = gen(n)
        first_s = time.perf_counter() - t0
        first_compiles = compiles[logged:]
        (jitted,) = model._jitted.values()  # one program: (bucket, budget, greedy, ...) of this workload
        full, short, outs = [], [], []
        for _ in range(spec["repeats"]):  # interleaved, so that load changes hit both alike; S needs no warm-up
            full += timed(lambda: outs.append(gen(n)), 1)
            short += timed(lambda: gen(s), 1)
        last = outs[-1]
        programs = jitted._cache_size()
        # the batch as generate runs it: grown to its power-of-two bucket (B = 1, 8, 32 stay as they are)
        inputs = model._pad_batch(ids, np.ones_like(ids), images, images_aux, 0)
    counts = _generated(last.token_ids, {eos}, n)
    if counts != [n] * b or not (first.token_ids == last.token_ids).all():
        raise SystemExit(f"generated {counts} tokens per row (wanted {n} each), or the calls disagree")
    bucket = length_bucket(merged, config.max_length)
    phases, (logits, cache, *_) = _phases(module, params, inputs, bucket, _budget(n), spec["repeats"])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return {"framework": "jax", "params": n_params, "merged_len": merged,
            "compiled_len": bucket, "init_s": init_s, "first_s": first_s,
            "times_s": full, "short_times_s": short, "generated_per_row": counts, "programs": programs,
            "sample_text": last.text[0][:80], **device_info(),
            "padded_batch": len(inputs[0]),
            "generate_compile_s": sum(sec for _, sec in first_compiles),
            "generate_xla_compile_s": sum(sec for what, sec in first_compiles if what == "xla"),
            **phases,
            # the separate prefill is the generate program's own: its greedy pick is the first new token
            "prefill_first_token_matches": bool((np.argmax(logits[:b], -1) == first.token_ids[:, 0]).all()),
            "decode_bytes_per_step": _decode_bytes(params, cache, config.lm.tie_word_embeddings)}


def _copy_bandwidth(n: int, calls: int) -> dict:
    """Measured memory bandwidth: a jitted x + 1 over float32 [n] reads and writes n x 4 bytes; best of `calls`.
    x is donated, so the update is in place, as the decode loop's cache is (a fresh output buffer each
    call would time the page faults: 7 instead of 51 GB/s on the 2-core CPU)."""
    import jax
    import jax.numpy as jnp

    bump = jax.jit(lambda x: x + 1, donate_argnums=0)
    state = [bump(jnp.ones((n,), jnp.float32)).block_until_ready()]

    def step():
        state[0] = bump(state[0]).block_until_ready()

    nbytes = 2 * state[0].nbytes
    best = min(timed(step, calls))
    return {"bytes": nbytes, "best_s": best, "bytes_per_s": nbytes / best, "what": "in-place x + 1 (donated)"}


def child_machine(spec: dict) -> dict:
    """The machine's float32 ceilings (mgjax generates in float32): bench/train.py's matmul chain, unless
    spec["matmul"] is false (a ceiling reused from train.json), and the copy bandwidth (256 MB on a CPU, 1 GiB
    else: well past the caches)."""
    import jax

    on_cpu = jax.devices()[0].platform == "cpu"
    out = {**device_info(), "copy": _copy_bandwidth(1 << (26 if on_cpu else 28), 5)}
    if spec["matmul"]:
        out["matmul"] = child_matmul(matmul_spec(on_cpu, "float32", spec.get("n")))
    return out


def child_torch(spec: dict) -> dict:
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    config = model_config(spec["config"])
    lm, b, n, s = config.lm, spec["batch"], spec["new_tokens"], spec["short"]
    if lm.family != "llama":
        raise SystemExit(f"the reference is LlamaForCausalLM, {spec['config']} has a {lm.family} LLM")
    length = spec["prompt_tokens"] - 1 + config.tokens_per_image  # the merged length, as text
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    eos = lm.vocab_size - 1
    hf = hf_llama_config(lm, length + n, bos_token_id=0, eos_token_id=eos, pad_token_id=0)
    model = LlamaForCausalLM(hf).eval()
    ids = torch.randint(len(SPECIAL), lm.vocab_size - 1, (b, length))
    ids[:, 0] = 0
    mask = torch.ones_like(ids)

    def gen(k):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
                                  do_sample=False, pad_token_id=0, eos_token_id=eos)

    t0 = time.perf_counter()
    first = gen(n)
    first_s = time.perf_counter() - t0
    full, short = [], []
    for _ in range(spec["repeats"]):
        full += timed(lambda: gen(n), 1)
        short += timed(lambda: gen(s), 1)
    new = first[:, length:]
    if new.shape != (b, n):
        raise SystemExit(f"HF generated {tuple(new.shape)} new tokens, wanted ({b}, {n})")
    return {"framework": "torch", "device_kind": "torch cpu", "platform": "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()), "merged_len": length, "compiled_len": length,
            "first_s": first_s, "times_s": full, "short_times_s": short, "generated_per_row": [n] * b}


def derive(row: dict, ceiling: float | None = None, bandwidth: float | None = None) -> None:
    """The table's columns from a child's timings; with the matmul `ceiling` (FLOP/s) the encode and
    prefill MFU, with the copy `bandwidth` (bytes/s) the decode's memory-bound tokens/s (jax rows)."""
    b, n, s = row["batch"], row["new_tokens"], row["short"]
    wall, wall_s = statistics.median(row["times_s"]), statistics.median(row["short_times_s"])
    step = (wall - wall_s) / (n - s)
    row.update({"wall_s": wall, "short_wall_s": wall_s, "questions_per_s": b / wall, "tokens_per_s": b * n / wall,
                "decode_s_per_step": step, "decode_tokens_per_s": b / step if step > 0 else None,
                "prefill_s": wall - (n - 1) * step,
                "compile_s": row["first_s"] - wall if row["framework"] == "jax" else None})
    for phase in ("encode", "prefill_pass"):
        flops = row.get(f"{phase}_flops")
        if flops is not None:
            row[f"{phase}_flops_per_s"] = flops / row[f"{phase}_s"]
            row[f"{phase}_mfu"] = row[f"{phase}_flops_per_s"] / ceiling if ceiling else None
    if "decode_bytes_per_step" in row and bandwidth:
        # every row of the padded batch decodes; the real ones (B of them) are the tokens counted
        row["decode_bound_tokens_per_s"] = b * bandwidth / row["decode_bytes_per_step"]
        row["decode_bandwidth_util"] = (row["decode_tokens_per_s"] / row["decode_bound_tokens_per_s"]
                                        if row["decode_tokens_per_s"] else None)


def machine_ceilings(reuse: str | None, n: int | None, env: dict) -> tuple[dict | None, dict | None]:
    """(matmul ceiling, copy bandwidth) as dicts with flops_per_s / bytes_per_s, or None where unmeasured.
    The ceiling is bench/train.py's from its JSON `reuse` when that was measured in float32 (train's
    'auto' dtype is float32 on a CPU only; an accelerator's bfloat16 ceiling would flatter float32 MFU),
    else measured here by train.py's `child_matmul` in float32."""
    ceiling = None
    if reuse and Path(reuse).is_file():
        import json

        found = json.loads(Path(reuse).read_text()).get("matmul_ceiling") or {}
        if found.get("dtype") == "float32":
            ceiling = {**found, "source": str(reuse)}
        else:
            print(f"{reuse}: its matmul ceiling is {found.get('dtype')}, not float32: measuring one", flush=True)
    got = run_child(__file__, "machine", {"matmul": ceiling is None, "n": n}, env, ())
    if "error" in got:
        print(f"  machine ceilings failed: {got['error']} (no MFU, no decode bound)", flush=True)
        return ceiling, None
    if ceiling is None:
        ceiling = {**got["matmul"], "source": "measured here: bench/train.py child_matmul, float32"}
    return ceiling, got["copy"]


# --- main ----------------------------------------------------------------------------------------

def _fmt(x, spec: str) -> str:
    width = "".join(c for c in spec.split(".")[0] if c.isdigit() or c in "<>")
    return format("-", width) if x is None else format(x, spec)


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise SystemExit(f"{what}: comma-separated integers, got {text!r}") from None


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _phase_table(rows: list[dict]) -> None:
    """The mgjax rows' encode / prefill / decode breakdown."""
    head = (f"{'config':<6} {'B':>3} {'gen compile s':>13} {'enc s':>7} {'enc comp s':>10} {'enc GFLOP':>9} "
            f"{'enc MFU':>7} {'pf s':>7} {'pf comp s':>9} {'pf GFLOP':>8} {'pf MFU':>7} {'decode tok/s':>12} "
            f"{'bound tok/s':>11} {'of bound':>8}")
    print(head)
    print("-" * len(head))
    gflop = lambda x: None if x is None else x / 1e9  # noqa: E731
    for r in rows:
        if r.get("framework") != "jax" or "error" in r:
            continue
        print(f"{r['config']:<6} {r['batch']:>3} {r['generate_compile_s']:>13.2f} {r['encode_s']:>7.4f} "
              f"{r['encode_compile_s']:>10.2f} {_fmt(gflop(r['encode_flops']), '>9.3f')} "
              f"{_pct(r.get('encode_mfu')):>7} {r['prefill_pass_s']:>7.4f} {r['prefill_pass_compile_s']:>9.2f} "
              f"{_fmt(gflop(r['prefill_pass_flops']), '>8.3f')} {_pct(r.get('prefill_pass_mfu')):>7} "
              f"{_fmt(r['decode_tokens_per_s'], '>12.1f')} {_fmt(r.get('decode_bound_tokens_per_s'), '>11.1f')} "
              f"{_pct(r.get('decode_bandwidth_util')):>8}")


def _with_spec(case):
    """A case whose row also records the spec's settings."""
    keys = ("config", "batch", "new_tokens", "short", "prompt_tokens", "repeats")
    return lambda spec: {**case(spec), **{k: spec[k] for k in keys}}


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    sys.path.insert(0, str(ROOT))  # this checkout's mgjax
    if argv[:1] == ["_child"]:
        child({"jax": _with_spec(child_jax), "torch": _with_spec(child_torch), "machine": child_machine}, *argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,100m", help="comma-separated: tiny, 100m")
    p.add_argument("--batch-sizes", default="1,8", help="questions per generate call (mgjax; 32 is slow on a CPU)")
    p.add_argument("--torch-batch-sizes", default="1,8", help="batch sizes of the PyTorch reference")
    p.add_argument("--new-tokens", type=int, default=32, help="N: new tokens per question")
    p.add_argument("--prompt-tokens", type=int, default=40,
                   help="text ids per question incl. bos and the image placeholder (merged: this - 1 + visual)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per budget (N and S); the median is used")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                   help="the HF transformers LlamaForCausalLM.generate reference")
    p.add_argument("--ceiling", metavar="TRAIN_JSON",
                   help="reuse the matmul ceiling of a bench/train.py result if it is float32 (else measured)")
    p.add_argument("--matmul-size", type=int, help="side of the ceiling's square matmul (default: CPU 4096, else 8192)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    configs = [c for c in args.configs.split(",") if c]
    batches = _ints(args.batch_sizes, "--batch-sizes")
    torch_batches = _ints(args.torch_batch_sizes, "--torch-batch-sizes") if args.torch else []
    if args.new_tokens < 2 or args.prompt_tokens < 3 or args.repeats < 1 or min(batches + torch_batches) < 1:
        raise SystemExit("--new-tokens >= 2, --prompt-tokens >= 3, --repeats >= 1, batch sizes >= 1")
    for c in configs:
        model_config(c)
    short = short_budget(args.new_tokens)
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    print(f"{os.cpu_count()} CPUs; N = {args.new_tokens} new tokens (S = {short} for the decode-only difference), "
          f"{args.prompt_tokens} prompt ids + 1 image per question", flush=True)

    ceiling, copy = machine_ceilings(args.ceiling, args.matmul_size, env) if batches else (None, None)
    peak, bandwidth = (ceiling or {}).get("flops_per_s"), (copy or {}).get("bytes_per_s")
    if peak:
        print(f"float32 matmul ceiling {peak / 1e12:.3f} TFLOP/s ({ceiling['source']})", flush=True)
    if bandwidth:
        print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (jitted in-place x + 1 over {copy['bytes'] / 2e6:.0f} MB)",
              flush=True)

    rows = []
    for c in configs:
        cases = [("jax", bt) for bt in batches] + [("torch", bt) for bt in torch_batches]
        for fw, bt in cases:
            spec = {"config": c, "batch": bt, "new_tokens": args.new_tokens, "short": short,
                    "prompt_tokens": args.prompt_tokens, "repeats": args.repeats}
            print(f"{c} {fw} B={bt} ...", flush=True)
            row = run_child(__file__, fw, spec, env if fw == "jax" else {**env, "CUDA_VISIBLE_DEVICES": ""},
                            ("framework", "config", "batch"))
            rows.append(row)
            if "error" in row:
                row["framework"] = fw  # not in the spec, so the error row has it as None
                print(f"  failed: {row['error']}", flush=True)
                continue
            derive(row, peak, bandwidth)
            print(f"  first {row['first_s']:.1f} s, wall {row['wall_s']:.2f} s, {row['questions_per_s']:.2f} "
                  f"questions/s, {row['tokens_per_s']:.1f} tokens/s (child {row['child_wall_s']:.0f} s)", flush=True)
            if fw == "jax" and not row["prefill_first_token_matches"]:
                print("  warning: the separate prefill's greedy token differs from generate's first token", flush=True)

    head = (f"{'config':<6} {'framework':<9} {'B':>3} {'L':>4} {'comp L':>6} {'first s':>7} {'compile s':>9} "
            f"{'wall s':>7} {'questions/s':>11} {'tokens/s':>8} {'decode s/step':>13} {'decode tok/s':>12} "
            f"{'prefill s':>9} {'new':>4} {'recompiles':>10} {'load':>5}")
    print()
    print("L = merged prompt length (torch: text only, no vision towers); comp L = the length mgjax compiles "
          "(its bucket)")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r.get('config', ''):<6} {r['framework']:<9} {r.get('batch', ''):>3} failed: {r['error']}")
            continue
        rec = r["programs"] - 1 if "programs" in r else None
        print(f"{r['config']:<6} {r['framework']:<9} {r['batch']:>3} {r['merged_len']:>4} {r['compiled_len']:>6} "
              f"{r['first_s']:>7.2f} {_fmt(r['compile_s'], '>9.2f')} {r['wall_s']:>7.3f} "
              f"{r['questions_per_s']:>11.3f} {r['tokens_per_s']:>8.1f} {r['decode_s_per_step']:>13.4f} "
              f"{_fmt(r['decode_tokens_per_s'], '>12.1f')} {r['prefill_s']:>9.3f} {min(r['generated_per_row']):>4} "
              f"{_fmt(rec, '>10d')} {r['loadavg_1min_before']:>5.1f}")

    if any(r.get("framework") == "jax" and "error" not in r for r in rows):
        print()
        print("mgjax phases, each its own program on generate's padded batch: enc = encode_images (towers, mining, "
              "projector); pf = prefill without the towers (splice, LLM pass into the KV cache, last logits); "
              "GFLOP = XLA cost_analysis; MFU vs the float32 matmul ceiling; gen compile s = trace + lower + XLA "
              "compile inside generate's first call; bound tok/s = B x copy bandwidth / decode bytes per step")
        _phase_table(rows)

    targets = {}
    for c in configs:
        ok = {(r["framework"], r["batch"]): r for r in rows if r.get("config") == c and "error" not in r}
        t = {}
        if ("jax", 1) in ok and ("jax", 8) in ok:
            t["batch8_over_batch1_questions_per_s"] = ok["jax", 8]["questions_per_s"] / ok["jax", 1]["questions_per_s"]
        if ("jax", 1) in ok and ("torch", 1) in ok:
            j, h = ok["jax", 1], ok["torch", 1]
            t["batch1_tokens_per_s_over_hf"] = j["tokens_per_s"] / h["tokens_per_s"]
            if j["decode_tokens_per_s"] and h["decode_tokens_per_s"]:
                t["batch1_decode_tokens_per_s_over_hf"] = j["decode_tokens_per_s"] / h["decode_tokens_per_s"]
        if t:
            targets[c] = t
            print(f"{c}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()) +
                  "   (targets: batch8/batch1 questions/s >= 4; batch-1 decode vs HF >= 2)")

    from importlib.metadata import version

    jax_row = next((r for r in rows if r.get("framework") == "jax" and "error" not in r), {})
    result = {
        "benchmark": "generate", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": [sys.executable, *sys.argv],
        "device": {k: jax_row.get(k) for k in ("platform", "device_kind", "device_count")},
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                 "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)},
        "versions": {"python": platform.python_version(),
                     **{m: version(m) for m in ("jax", "jaxlib", "flax", "numpy")}},
        "settings": {"new_tokens": args.new_tokens, "short": short, "prompt_tokens": args.prompt_tokens,
                     "repeats": args.repeats, "dtype": "float32", "decoding": "greedy"},
        "notes": ["wall_s: median of `repeats` generate calls of B questions x new_tokens (after a first call)",
                  "decode_s_per_step: (median wall(N) - median wall(S)) / (N - S), same compiled program",
                  "torch rows: HF LlamaForCausalLM.generate on text prompts of the merged length (no vision towers)",
                  "mgjax rows: random weights; eos is one id past the model vocabulary, so rows never stop early",
                  "encode_* / prefill_pass_*: MGM.encode_images and MGM.prefill (its encode_images answered by "
                  "encode's output) as separate AOT-compiled programs on the padded batch; *_flops: "
                  "compiled.cost_analysis(); *_mfu: flops / median s / matmul_ceiling (float32)",
                  "generate_compile_s: jax.monitoring trace + lower + XLA compile durations in the first call",
                  "decode_bound_tokens_per_s: B x copy_bandwidth / decode_bytes_per_step (LLM weights without an "
                  "untied input table + the whole KV cache)"],
        "matmul_ceiling": ceiling, "copy_bandwidth": copy,
        "targets": targets, "rows": rows,
    }
    write_results(result, args.out, optional=("torch", "transformers"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
