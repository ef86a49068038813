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

from children import ROOT, child, device_info, run_child, write_results  # bench/, the script's folder, is on sys.path
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


def _timed(fn, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _generated(token_ids, stop_ids, n: int) -> list[int]:
    """Tokens each row generated: up to and including its first stop id, else all n."""
    import numpy as np

    out = []
    for row in np.asarray(token_ids):
        hits = np.flatnonzero(np.isin(row, list(stop_ids)))
        out.append(int(hits[0]) + 1 if len(hits) else n)
    return out


def child_jax(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mgjax.model import MGM, init_params, merged_lengths
    from mgjax.pretrained import Pretrained, length_bucket

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

        t0 = time.perf_counter()
        first = gen(n)
        first_s = time.perf_counter() - t0
        (jitted,) = model._jitted.values()  # one program: (bucket, budget, greedy, ...) of this workload
        full, short, outs = [], [], []
        for _ in range(spec["repeats"]):  # interleaved, so that load changes hit both alike; S needs no warm-up
            full += _timed(lambda: outs.append(gen(n)), 1)
            short += _timed(lambda: gen(s), 1)
        last = outs[-1]
        programs = jitted._cache_size()
    counts = _generated(last.token_ids, {eos}, n)
    if counts != [n] * b or not (first.token_ids == last.token_ids).all():
        raise SystemExit(f"generated {counts} tokens per row (wanted {n} each), or the calls disagree")
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return {"framework": "jax", "params": n_params, "merged_len": merged,
            "compiled_len": length_bucket(merged, config.max_length), "init_s": init_s, "first_s": first_s,
            "times_s": full, "short_times_s": short, "generated_per_row": counts, "programs": programs,
            "sample_text": last.text[0][:80], **device_info()}


def child_torch(spec: dict) -> dict:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    config = model_config(spec["config"])
    lm, b, n, s = config.lm, spec["batch"], spec["new_tokens"], spec["short"]
    if lm.family != "llama":
        raise SystemExit(f"the reference is LlamaForCausalLM, {spec['config']} has a {lm.family} LLM")
    length = spec["prompt_tokens"] - 1 + config.tokens_per_image  # the merged length, as text
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    eos = lm.vocab_size - 1
    hf = LlamaConfig(vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
                     num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads,
                     num_key_value_heads=lm.num_kv_heads, head_dim=lm.head_dim,
                     max_position_embeddings=max(lm.max_position_embeddings, length + n), rms_norm_eps=lm.norm_eps,
                     rope_theta=lm.rope_theta, tie_word_embeddings=lm.tie_word_embeddings, hidden_act="silu",
                     bos_token_id=0, eos_token_id=eos, pad_token_id=0)
    hf._attn_implementation = "sdpa"
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
        full += _timed(lambda: gen(n), 1)
        short += _timed(lambda: gen(s), 1)
    new = first[:, length:]
    if new.shape != (b, n):
        raise SystemExit(f"HF generated {tuple(new.shape)} new tokens, wanted ({b}, {n})")
    return {"framework": "torch", "device_kind": "torch cpu", "platform": "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()), "merged_len": length, "compiled_len": length,
            "first_s": first_s, "times_s": full, "short_times_s": short, "generated_per_row": [n] * b}


def derive(row: dict) -> None:
    """The table's columns from a child's timings."""
    b, n, s = row["batch"], row["new_tokens"], row["short"]
    wall, wall_s = statistics.median(row["times_s"]), statistics.median(row["short_times_s"])
    step = (wall - wall_s) / (n - s)
    row.update({"wall_s": wall, "short_wall_s": wall_s, "questions_per_s": b / wall, "tokens_per_s": b * n / wall,
                "decode_s_per_step": step, "decode_tokens_per_s": b / step if step > 0 else None,
                "prefill_s": wall - (n - 1) * step,
                "compile_s": row["first_s"] - wall if row["framework"] == "jax" else None})


# --- main ----------------------------------------------------------------------------------------

def _fmt(x, spec: str) -> str:
    width = "".join(c for c in spec.split(".")[0] if c.isdigit() or c in "<>")
    return format("-", width) if x is None else format(x, spec)


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise SystemExit(f"{what}: comma-separated integers, got {text!r}") from None


def _with_spec(case):
    """A case whose row also records the spec's settings."""
    keys = ("config", "batch", "new_tokens", "short", "prompt_tokens", "repeats")
    return lambda spec: {**case(spec), **{k: spec[k] for k in keys}}


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    sys.path.insert(0, str(ROOT))  # this checkout's mgjax
    if argv[:1] == ["_child"]:
        child({"jax": _with_spec(child_jax), "torch": _with_spec(child_torch)}, *argv[1:])
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
                print(f"  failed: {row['error']}", flush=True)
                continue
            derive(row)
            print(f"  first {row['first_s']:.1f} s, wall {row['wall_s']:.2f} s, {row['questions_per_s']:.2f} "
                  f"questions/s, {row['tokens_per_s']:.1f} tokens/s (child {row['child_wall_s']:.0f} s)", flush=True)

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
                  "mgjax rows: random weights; eos is one id past the model vocabulary, so rows never stop early"],
        "targets": targets, "rows": rows,
    }
    write_results(result, args.out, optional=("torch", "transformers"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
