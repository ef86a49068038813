"""The `mgjax` command. Exit codes: 0 success, 2 bad input (with a one-line reason)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from mgjax import interrupt, jobenv
from mgjax.errors import MGJaxError


def _add_tower_args(p: argparse.ArgumentParser):
    p.add_argument("--vision-tower", metavar="DIR",
                   help="CLIP tower folder (overrides config.json's mm_vision_tower; only needed when the "
                        "checkpoint lacks the tower weights)")
    p.add_argument("--vision-tower-aux", metavar="DIR",
                   help="OpenCLIP ConvNeXt tower folder (overrides config.json's mm_vision_tower_aux; the "
                        "original reads the ConvNeXt from it, not from the checkpoint)")
    p.add_argument("--towers-from-checkpoint", action="store_true",
                   help="take every tower the checkpoint holds from the checkpoint, even where the original reads "
                        "the tower folder (when that folder is not at hand; bf16 copies are rounded)")
    p.add_argument("--base-llm", metavar="DIR",
                   help="base LLM checkpoint folder, for a stage-1 release (mm_projector.bin)")


def _tower_kwargs(args) -> dict:
    """`load_pretrained` / `convert` arguments of `_add_tower_args`."""
    return dict(vision_tower=args.vision_tower, vision_tower_aux=args.vision_tower_aux, base_llm=args.base_llm,
                towers_from_checkpoint=args.towers_from_checkpoint)


def _add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int):
    p.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens,
                   help=f"answer length limit (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (default 0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stop", action="append", help="a string that ends the answer (repeat for several)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter and compute dtype")


def _add_quantize_arg(p: argparse.ArgumentParser):
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="store the LLM's matrices int8 (per output channel) or int4 (groups of 128) and compute in "
                   "--dtype on them: about 0.5x / 0.28x of the LLM's bfloat16 weight memory; the towers, norms and "
                   "Mixtral's router stay float (README, Quantised inference)")


def _load(args, ckpt: str, **kwargs):
    """`load_pretrained(ckpt, **kwargs)` with the command's --quantize; a quantised model's LLM weight bytes
    (against bfloat16's) go to stderr, apart from the answers on stdout."""
    import mgjax
    from mgjax.quant import weight_report

    model = mgjax.load_pretrained(ckpt, quantize=args.quantize, **kwargs)
    if args.quantize:
        print(weight_report(model.config, model.params), file=sys.stderr, flush=True)
    return model


def _add_template_arg(p: argparse.ArgumentParser):
    from mgjax.data.templates import TEMPLATES

    p.add_argument("--template", choices=list(TEMPLATES),
                   help="conversation template (default: read from the checkpoint: tokenizer special tokens, "
                        "model family, folder name)")


def cmd_predict(args) -> int:
    """Next-token prediction for one image and question: the quickest end-to-end check of a checkpoint."""
    from pathlib import Path

    import jax
    import numpy as np

    import mgjax
    from mgjax.data.image import load_image
    from mgjax.data.tokenize import load_tokenizer
    from mgjax.model import merged_lengths

    # The cheap checks first: a bad image or missing tokenizer must not wait for the weights to load.
    if not Path(args.checkpoint).is_dir():
        raise MGJaxError(f"{args.checkpoint}: checkpoint folder not found")
    image = load_image(args.image)
    load_tokenizer(args.base_llm or args.checkpoint)
    model = mgjax.load_pretrained(args.checkpoint, dtype=args.dtype, template=args.template, **_tower_kwargs(args))
    images, images_aux = model.preprocess(image)
    prompt = model.build_prompt(args.question)
    ids = model.tokenize(prompt)[None]
    c = model.config
    last = int(merged_lengths(ids, np.ones_like(ids), c.tokens_per_image)[0]) - 1
    logits = np.asarray(model.logits(ids, images[None], images_aux[None]))[0, last]
    probs = np.asarray(jax.nn.softmax(logits))
    top = np.argsort(-logits)[:args.top_k]
    print(f"model: {c.lm.family}, {c.lm.num_layers} layers, hidden {c.lm.hidden_size}, template {c.template} "
          f"({model.template_evidence}); {ids.shape[1]} prompt ids -> {logits.shape[0]}-way logits at position {last}")
    print(f"prompt: {prompt!r}")
    print("next token:")
    for i in top:
        print(f"  {int(i):>7d}  p={probs[i]:.4f}  logit={logits[i]:+.4f}  {model.tokenizer.decode([int(i)])!r}")
    return 0


def cmd_convert(args) -> int:
    """Released PyTorch layout (or stage-1 release + base LLM) -> mgjax (Orbax) checkpoint folder."""
    from mgjax.convert.mgjax_ckpt import convert

    t = time.time()
    out = convert(args.src, args.out, dtype=args.dtype, scan_layers=args.scan_layers, template=args.template,
                  overwrite=args.overwrite, **_tower_kwargs(args))
    print(f"converted {args.src} -> {out} ({args.dtype}, {'scanned' if args.scan_layers else 'per-layer'} "
          f"layout) in {time.time() - t:.1f} s")
    return 0


def cmd_export(args) -> int:
    """mgjax checkpoint folder -> released layout (config.json, indexed safetensors, tokenizer)."""
    from mgjax.convert.export import export

    t = time.time()
    out = export(args.ckpt, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1024**3),
                 overwrite=args.overwrite, merge_lora=args.merge_lora, lora_only=args.lora_only)
    print(f"exported {args.ckpt} -> {out} in {time.time() - t:.1f} s")
    return 0


def _generation_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=args.stop or None)


def _read_prompts(path: str, image_root: str | None) -> list[dict]:
    """JSONL prompts {"question_id" | "id", "text" | "question", "image": path | [paths] | absent}, every
    line checked (and every image opened) before the model loads."""
    from mgjax.data.image import load_image

    rows, root = [], Path(image_root or Path(path).parent)
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise MGJaxError(f"{path}: cannot read the prompts ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            text = rec.get("text", rec.get("question"))
            if not isinstance(text, str):
                raise ValueError('no "text" (or "question") string')
        except (ValueError, AttributeError) as e:
            raise MGJaxError(f"{path} line {n}: not a prompt record ({e}); each line is a JSON object with "
                             '"question_id", "text" and optionally "image"') from None
        names = rec.get("image") or []
        names = [names] if isinstance(names, str) else names
        images = [load_image(root / name) for name in names]
        rows.append({"question_id": rec.get("question_id", rec.get("id", n)), "text": text, "images": images})
    if not rows:
        raise MGJaxError(f"{path}: no prompts")
    return rows


def cmd_generate(args) -> int:
    """Answers for one image and question, or for a JSONL file of prompts (in batches), greedy by default."""
    import numpy as np

    from mgjax.data.image import load_image

    if args.dry_run:
        return _inference_dry_run(args, args.checkpoint, args.max_new_tokens, "generate")
    if not Path(args.checkpoint).is_dir():
        raise MGJaxError(f"{args.checkpoint}: checkpoint folder not found")
    if (args.prompts is None) == (args.question is None):
        raise MGJaxError("give a --question (with --image, or none for text only) or --prompts FILE.jsonl")
    rows = (_read_prompts(args.prompts, args.image_root) if args.prompts else
            [{"question_id": 0, "text": args.question, "images": [load_image(i) for i in args.image or ()]}])
    import jax

    if jax.process_index() != 0:  # in a job, process 0 answers (a prompt file is no collective's work)
        return 0
    model = _load(args, args.checkpoint, dtype=args.dtype, template=args.template, mesh=_local_mesh(args),
                  **_tower_kwargs(args))
    # Answers go to OUT.partial, renamed to OUT when every prompt is answered.
    partial = Path(f"{args.out}.partial") if args.out else None
    out = open(partial, "w") if partial else None
    try:
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start:start + args.batch_size]
            inputs = [model.prompt_inputs(r["text"], r["images"]) for r in chunk]
            result = model.generate([i[0] for i in inputs], np.concatenate([i[1] for i in inputs]),
                                    np.concatenate([i[2] for i in inputs]), **_generation_kwargs(args))
            for r, text in zip(chunk, result.text):
                line = {"question_id": r["question_id"], "prompt": r["text"], "text": text}
                if out:
                    out.write(json.dumps(line) + "\n")
                else:
                    print(text if not args.prompts else json.dumps(line))
    finally:
        if out:
            out.close()
    if partial:
        partial.replace(args.out)
    return 0


def cmd_chat(args) -> int:
    """A multi-turn conversation on stdin: one message per line; `/image PATH` attaches an image to the next
    message, `/reset` starts over, `/quit` (or end of input) ends. `--gen` asks for images (MGM_SPEC 8)."""
    from mgjax.data.image import load_image
    from mgjax.infer.chat import Chat, generation_prompt

    if not Path(args.checkpoint).is_dir():
        raise MGJaxError(f"{args.checkpoint}: checkpoint folder not found")
    pipeline = _sdxl(args.sdxl) if args.sdxl else None
    pending = [load_image(p) for p in args.image or ()]
    model = _load(args, args.checkpoint, dtype=args.dtype, template=args.template, **_tower_kwargs(args))
    chat = Chat(model, _generation_kwargs(args))
    out_dir = Path(args.gen_dir)
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return 0
        line = line.strip()
        if line == "/reset":
            chat.reset()
            pending = []
        elif line.startswith("/image"):
            try:  # a bad path must not end the conversation
                pending.append(load_image(line[len("/image"):].strip()))
            except MGJaxError as e:
                print(f"mgjax chat: {e}", file=sys.stderr)
        elif line:
            answer = chat.ask(line, pending, gen=args.gen)
            pending = []
            print(answer, flush=True)
            prompt = generation_prompt(answer) if args.gen else None
            if prompt is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                n = len(chat.turns) // 2
                (out_dir / f"gen_{n}.txt").write_text(prompt + "\n")
                print(f"[image prompt: {prompt!r} -> {out_dir / f'gen_{n}.txt'}]", file=sys.stderr)
                if pipeline is not None:
                    pipeline(prompt=prompt).images[0].save(out_dir / f"gen_{n}.png")
                    print(f"[image: {out_dir / f'gen_{n}.png'}]", file=sys.stderr)


def cmd_serve(args) -> int:
    """An OpenAI-compatible /v1/chat/completions endpoint over the continuous-batching engine."""
    from mgjax.infer.server import Server

    if not Path(args.ckpt).is_dir():
        raise MGJaxError(f"{args.ckpt}: checkpoint folder not found")
    model = _load(args, args.ckpt, dtype=args.dtype, template=args.template, **_tower_kwargs(args))
    try:
        server = Server(model, args.host, args.port, args.slots, args.context, args.max_concurrent, args.timeout,
                        allow_paths=args.allow_paths, warm_text=args.warm_text, image_cache=args.image_cache << 20,
                        encoder_cache=args.encoder_cache << 20)
    except OSError as e:
        raise MGJaxError(f"cannot listen on {args.host}:{args.port} ({e.strerror})") from None
    host, port = server.address[:2]
    start = time.monotonic()
    server.start()
    print(f"compiling ({args.slots} slots of {server.engine.context} tokens) ...", flush=True)
    while not server.wait_ready(0.2):
        interrupt.check()
    print(f"serving {args.ckpt} as {server.model_id!r} on http://{host}:{port}/v1, chat page http://{host}:{port}/ "
          f"(ready in {time.monotonic() - start:.0f} s; Ctrl-C stops, SIGTERM finishes what is in flight)",
          flush=True)
    try:
        while True:  # the main thread only waits for Ctrl-C / SIGTERM (a signal Python dropped included)
            time.sleep(0.2)
            interrupt.check()
    except interrupt.Terminated:
        print(f"SIGTERM: answering the {server.inflight} requests in flight, refusing new ones", flush=True)
        server.drain()
        return 0
    finally:
        server.close()


def _sdxl(path: str):
    """An SDXL text-to-image pipeline from a local folder (diffusers, an optional extra)."""
    try:
        from diffusers import StableDiffusionXLPipeline
    except ImportError:
        raise MGJaxError("--sdxl needs diffusers (pip install diffusers); without --sdxl the image prompt is "
                         "printed and saved") from None
    if not Path(path).is_dir():
        raise MGJaxError(f"--sdxl {path}: folder not found (a local SDXL base pipeline, e.g. "
                         "stable-diffusion-xl-base-1.0)")
    return StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True)


def cmd_train(args) -> int:
    """Train (or resume) the run of CONFIG.yaml with key=value overrides; or only compile its step."""
    from mgjax.train.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    if args.dry_run:
        return _dry_run(args, cfg)
    from mgjax.train.loop import train

    result = train(cfg)
    print(f"step {result['step']}: {_run_files(Path(result['run_dir']))}")
    return 0


def _dry_run(args, cfg) -> int:
    """The step compiled for this machine's devices, for --devices N fake CPU devices (a child process:
    the device count is fixed when JAX starts), or for a TPU slice (exit 1 when it does not fit)."""
    if args.topology:
        from mgjax.topology import compiler_platform_only, parse_slice

        if args.devices:
            raise MGJaxError("--topology SLICE compiles for the slice's chips: leave out --devices")
        topology = parse_slice(args.topology)
        compiler_platform_only()
        from mgjax.train.aot import dry_run, report

        r = dry_run(cfg, topology)
        print(report(r))
        return 0 if r["fits"] else 1
    import jax

    want = args.devices or jax.device_count()
    if want != jax.device_count():
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={want}"}
        print(f"compiling for {want} fake CPU devices (this machine has {jax.device_count()} "
              f"{jax.default_backend()} device(s)): the memory figures are XLA:CPU's", file=sys.stderr)
        return subprocess.call([sys.executable, "-m", "mgjax", "train", args.config, *args.overrides, "--dry-run"],
                               env=env)
    from mgjax.train.aot import dry_run, report

    print(report(dry_run(cfg)))
    return 0


def _model_config(ckpt: str, args):
    """The MGMConfig a command would load from `ckpt` (a released folder's towers as `load_pretrained` finds
    them), or a preset's; no weights are read."""
    from mgjax.convert.mgjax_ckpt import is_mgjax_checkpoint
    from mgjax.convert.source import open_source
    from mgjax.train.checkpoints import is_run_dir

    p = Path(ckpt)
    if p.is_dir() and not (is_mgjax_checkpoint(p) or is_run_dir(p)):
        return open_source(p, args.vision_tower, args.vision_tower_aux, args.base_llm,
                           args.towers_from_checkpoint).config
    return _config_arg(ckpt)


def _local_mesh(args):
    """--mesh over this host's devices (each host answers its own share), or None: one device."""
    if not args.mesh:
        return None
    import jax

    from mgjax.config import MeshConfig
    from mgjax.sharding import make_mesh

    return make_mesh(MeshConfig.parse(args.mesh), jax.local_devices())


def _inference_dry_run(args, ckpt: str, max_new_tokens: int, what: str, beams: int = 1) -> int:
    """Generation's prompt pass and decode step compiled for a TPU slice's chips (exit 1 when they do not fit)."""
    from mgjax.topology import compiler_platform_only, parse_slice

    if not args.topology:
        raise MGJaxError(f"{what} --dry-run compiles for a TPU slice: give --topology SLICE (e.g. v5e-8)")
    topology = parse_slice(args.topology)
    compiler_platform_only()
    from mgjax.infer.aot import INFERENCE_MESH, Workload, dry_run, report

    work = Workload(args.batch_size * beams, max_new_tokens, args.prompt_tokens, args.dtype)
    config = _model_config(ckpt, args)
    if args.quantize:
        config = dataclasses.replace(config, lm=dataclasses.replace(config.lm, quant=args.quantize))
    r = dry_run(config, topology, work, args.mesh or INFERENCE_MESH)
    print(report(r, what))
    return 0 if r["fits"] else 1


def _run_files(run: Path) -> str:
    return (f"checkpoints in {run / 'checkpoints'}, metrics in {run / 'metrics.jsonl'}, "
            f"TensorBoard logs in {run / 'tensorboard'}")


def cmd_eval(args) -> int:
    """A benchmark's question file answered in jitted batches (LLaVA answer JSONL), then scored locally where
    a deterministic scorer exists; or the demo's held-out shapes."""
    from mgjax.eval.benchmarks import BENCHES
    from mgjax.train.checkpoints import is_run_dir

    if args.dry_run:
        if args.bench not in BENCHES:
            raise MGJaxError(f"eval {args.bench} has no --dry-run: it is the demo's CPU check")
        bench = BENCHES[args.bench]
        return _inference_dry_run(args, args.ckpt, args.max_new_tokens or bench.max_new_tokens,
                                  f"eval {args.bench}", bench.num_beams)
    if args.bench == "shapes":
        from mgjax.train.demo import heldout_accuracy

        model = _load(args, args.ckpt, **_tower_kwargs(args))
        accuracy, chance = heldout_accuracy(model.module, model.params, model.tokenizer, model.config,
                                            num_samples=args.num_samples)
        if is_run_dir(model.path):
            print(_run_files(model.path))
        print(f"held-out accuracy {100 * accuracy:.1f}% (chance {100 * chance:.1f}%)")
        return 0

    import dataclasses

    import jax

    from mgjax.eval import scores as sc
    from mgjax.eval.benchmarks import READERS
    from mgjax.eval.runner import merge_parts, read_questions, run

    if not (args.data and args.out):
        raise MGJaxError(f"eval {args.bench} needs --data (the question file) and --out")
    questions = READERS.get(args.bench, read_questions)(args.data)
    named = next((q["image"] for q in questions if q.get("image")), None)
    if named and not args.images:  # MMBench's TSV and the Parquet files carry their images
        raise MGJaxError(f"eval {args.bench}: the questions name image files ({named!r}, ...): give their folder "
                         "with --images")
    if args.limit:
        questions = questions[:args.limit]
    model = _load(args, args.ckpt, dtype=args.dtype, mesh=_local_mesh(args), **_tower_kwargs(args))
    pid, nproc = jax.process_index(), jax.process_count()
    bench = BENCHES[args.bench]
    if args.max_new_tokens:
        bench = dataclasses.replace(bench, max_new_tokens=args.max_new_tokens)
    run(model, bench, questions, args.images or ".", args.out, batch_size=args.batch_size, process_index=pid,
        process_count=nproc)
    if nproc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mgjax eval: every part written")
        if pid == 0:
            merge_parts(questions, args.out, nproc)
    if pid != 0:
        return 0
    print(f"answers: {args.out}")
    answers = sc.read_answers(args.out)
    has_answers = all(bench.has_answer(q) for q in questions)
    scores = None
    # the files the official scorers and servers read; the local scores where the data hold the answers
    if args.bench == "mmvet":
        print(f"MM-Vet grader file: {sc.mmvet_submission(answers, f'{args.out}.mmvet.json')}")
    elif args.bench == "mmbench":
        print(f"MMBench prediction sheet: {sc.mmbench_submission(answers, questions, f'{args.out}.submission.tsv')}")
        scores = sc.mmbench_scores(answers, questions) if has_answers else None
    elif args.bench == "mmmu":
        predictions = sc.mmmu_predictions(answers, questions)
        Path(f"{args.out}.mmmu.json").write_text(json.dumps(predictions, indent=1))
        print(f"MMMU predictions: {args.out}.mmmu.json")
        scores = sc.mmmu_scores(predictions, questions) if has_answers else None
    elif args.bench == "mathvista":
        print(f"MathVista responses (for its extract_answer.py): "
              f"{sc.mathvista_output(answers, questions, f'{args.out}.mathvista.json')}")
        scores = sc.mathvista_scores(answers, questions) if has_answers else None
    if args.annotations:
        scorers = {"textvqa": lambda: sc.textvqa_scores(answers, args.annotations),
                   "pope": lambda: sc.pope_scores(answers, questions, args.annotations),
                   "mme": lambda: sc.mme_scores(answers, args.annotations),
                   "scienceqa": lambda: sc.scienceqa_scores(answers, args.annotations)}
        if args.bench not in scorers:
            raise MGJaxError(f"{args.bench} takes no --annotations: "
                             + ("its data hold the answers" if args.bench in ("mmbench", "mmmu", "mathvista")
                                else "score it with the official tool"))
        try:
            scores = scorers[args.bench]()
        except MGJaxError as e:
            if not args.limit:
                raise
            # POPE and MME score whole categories as their official scripts pair them: a --limit run has not
            print(f"no local scores for a --limit run: {e}")
    if scores is not None:
        Path(f"{args.out}.scores.json").write_text(json.dumps(scores, indent=1))
        print(json.dumps(scores, indent=1))
    return 0


def cmd_data_pack(args) -> int:
    """LLaVA/MGM JSON + image folder -> ArrayRecord shards (grain and TFDS readable); bad records skipped."""
    import logging

    from mgjax.data.pack import pack

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    summary = pack(args.json, args.image_root, args.out, shard_size=args.shard_size, overwrite=args.overwrite)
    print(summary.line())
    return 0


def _config_arg(text: str):
    """A preset name, an mgjax checkpoint folder or run_dir, or a released folder (its config.json)."""
    import json
    from pathlib import Path

    from mgjax.config import MGMConfig
    from mgjax.presets import PRESETS
    from mgjax.convert.mgjax_ckpt import is_mgjax_checkpoint, read_meta
    from mgjax.train.checkpoints import is_run_dir

    if text in PRESETS:
        return PRESETS[text]
    p = Path(text)
    if is_mgjax_checkpoint(p) or is_run_dir(p):
        return read_meta(p)[0]
    if (p / "config.json").is_file():
        return MGMConfig.from_hf(json.loads((p / "config.json").read_text()))
    raise MGJaxError(f"{text!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder")


def cmd_plan(args) -> int:
    """Per-device memory of a training job on a mesh, from eval_shape and the rule table."""
    import math

    from mgjax.config import MeshConfig
    from mgjax.plan import format_plan, job_for, plan
    from mgjax.sharding import rules_for

    if args.search:
        return _plan_search(args)
    config = _config_arg(args.config)
    mesh = MeshConfig.parse(args.mesh)
    sizes = (mesh.data, mesh.fsdp, mesh.tensor, mesh.expert)
    devices = args.devices or (math.prod(sizes) if -1 not in sizes else None)
    if devices is None:
        raise MGJaxError("the mesh has a -1 axis: pass --devices N")
    overrides = {k: v for k, v in dict(stage=args.stage, global_batch=args.batch, seq_len=args.seq,
                                       grad_accum=args.accum, remat=args.remat).items() if v is not None}
    job = job_for(config, **overrides)
    p = plan(config, mesh, devices, job, rules_for(args.rules), args.chip)
    print(format_plan(args.config, p, mesh.resolve(devices), job, args.chip))
    return 0


def _plan_search(args) -> int:
    """Variants of a training run compiled for a TPU slice; the fastest that fits as overrides to paste."""
    from mgjax.topology import compiler_platform_only, parse_slice

    if not (args.topology and args.config.endswith((".yaml", ".yml"))):
        raise MGJaxError("plan --search compiles variants of a training run: give its CONFIG.yaml and "
                         "--topology SLICE")
    topology = parse_slice(args.topology)
    compiler_platform_only()
    from mgjax.train.search import search, summary

    print(f"compiling up to {args.candidates} variants of {args.config} for {topology.describe()}:", flush=True)
    result = search(args.config, args.overrides or [], topology, args.candidates,
                    echo=lambda line: print(line, flush=True))
    print(summary(result))
    return 0 if result["best"] else 1


def cmd_check_cluster(args) -> int:
    """Joins the job (see mgjax.distributed.initialize) and checks an all-reduce over every device."""
    from mgjax import distributed

    if not distributed.joined():  # a TPU pod: JAX finds the other hosts by itself
        distributed.initialize()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mgjax.config import MeshConfig
    from mgjax.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=-1, fsdp=1))
    ones = distributed.global_batch({"x": np.ones((jax.local_device_count(), 1), np.float32)}, mesh)["x"]
    total = float(jax.jit(jnp.sum)(ones))
    distributed.main_print(f"{jax.process_count()} processes, {jax.device_count()} devices "
                           f"({jax.devices()[0].device_kind}); all-reduce over all devices: {total:.0f}")
    if total != jax.device_count():
        raise MGJaxError(f"all-reduce gave {total}, expected {jax.device_count()}: collectives are broken")
    return 0


COMPILE_CACHE = "MGJAX_COMPILE_CACHE"


def compile_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for this process and returns its folder (None: off). A
    command run again (a restarted `mgjax serve`, a resumed `mgjax train`, the next `mgjax eval`) loads the
    programs it compiled before instead of compiling them again. The folder: $MGJAX_COMPILE_CACHE ("off" turns
    it off; a gs:// path serves a pod), else $XDG_CACHE_HOME/mgjax/xla or ~/.cache/mgjax/xla; JAX's own
    JAX_COMPILATION_CACHE_* variables win where set. Entries past 16 GiB go least recently used first."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.environ["JAX_COMPILATION_CACHE_DIR"] or None
    where = os.environ.get(COMPILE_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mgjax", "xla")
    if where.lower() == "off":
        return None
    if "://" not in where:
        try:  # JAX would warn about an unusable folder at every compile; say it once and go on without
            os.makedirs(where, exist_ok=True)
        except OSError as e:
            print(f"mgjax: compilation cache off: cannot create {where} ({e.strerror}); set {COMPILE_CACHE} to a "
                  "writable folder, or to off", file=sys.stderr)
            return None
    import jax

    jax.config.update("jax_compilation_cache_dir", where)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", 16 << 30)
    return where


# The commands that compute: in a multi-process job (`jobenv.in_job`) they join it before touching a device.
# `convert` and `export` (host memory only) and `chat` (a terminal) run on one process.
JOINING = ("train", "eval", "generate", "predict", "serve", "check-cluster")
ONE_PROCESS = ("convert", "export", "chat")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other bad input (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _add_inference_aot_args(p) -> None:
    p.add_argument("--mesh", help="split the model over this host's devices: e.g. fsdp=-1 or tensor=-1 (axes data, "
                   "fsdp, tensor, expert; default: one device; with --dry-run: fsdp=-1)")
    p.add_argument("--dry-run", action="store_true", help="only compile the prompt pass and one decode step for "
                   "--topology SLICE at --batch-size (times the beams of a beam-search benchmark) and the token "
                   "budget; the checkpoint may be a preset name (MGM-7B-HD)")
    p.add_argument("--prompt-tokens", type=_positive_int, default=512,
                   help="--dry-run: text tokens of the longest prompt, image tokens apart (default 512)")
    _add_topology_arg(p)


def _add_topology_arg(p) -> None:
    p.add_argument("--topology", metavar="SLICE", help="compile with the TPU compiler (libtpu, no TPU needed) "
                   "for a Cloud TPU slice: v5p-64 (TensorCores), v5litepod-16 / v5e-16, v6e-256, v4-32, or "
                   "v5p:4x4x2; prints HBM per chip and `fits: yes|no` (exit 1 when it does not fit)")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mgjax", description="Mini-Gemini (MGM) in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="next-token prediction for one image and question")
    p.add_argument("checkpoint", help="MGM checkpoint folder (released layout or written by mgjax convert)")
    p.add_argument("--image", required=True, help="image file (any format PIL reads)")
    p.add_argument("--question", default="What is unusual about this image?", help="the user's question")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter and compute dtype")
    p.add_argument("--top-k", type=_positive_int, default=5, help="how many next tokens to print")
    _add_template_arg(p)
    _add_tower_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("generate", help="answer a question about images, or a JSONL file of prompts, in batches")
    p.add_argument("checkpoint", help="MGM checkpoint folder (released, mgjax convert or a run_dir of mgjax train)")
    p.add_argument("--question", help="one question (with --image: one or more images; without: text only)")
    p.add_argument("--image", action="append", help="an image file for --question (repeat for several)")
    p.add_argument("--prompts", help='JSONL: {"question_id", "text", "image": path | [paths] | absent} per line')
    p.add_argument("--image-root", help="folder the --prompts image paths are relative to (default: its folder)")
    p.add_argument("--out", help="write JSONL answers {question_id, prompt, text} here instead of stdout")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per jitted batch (default 8)")
    _add_generation_args(p, max_new_tokens=128)
    _add_quantize_arg(p)
    _add_template_arg(p)
    _add_tower_args(p)
    _add_inference_aot_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat on stdin (`/image PATH`, `/reset`, `/quit`)")
    p.add_argument("checkpoint", help="MGM checkpoint folder (released, mgjax convert or a run_dir of mgjax train)")
    p.add_argument("--image", action="append", help="an image for the first message (repeat for several)")
    p.add_argument("--gen", action="store_true", help="ask for images: ' <GEN>' ends each message and the "
                   "answer's <h>...</h> prompt is saved (and rendered with --sdxl)")
    p.add_argument("--gen-dir", default=".", help="where --gen writes gen_N.txt (and gen_N.png)")
    p.add_argument("--sdxl", help="a local SDXL pipeline folder to render --gen prompts (needs diffusers)")
    _add_generation_args(p, max_new_tokens=512)
    _add_quantize_arg(p)
    _add_template_arg(p)
    _add_tower_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible /v1/chat/completions server (continuous batching, "
                       "streaming) with a chat page")
    p.add_argument("--ckpt", required=True, help="MGM checkpoint folder (released, mgjax convert or a run_dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--slots", "--max-batch", type=_positive_int, default=8,
                   help="requests decoded together: rows of the KV cache (default 8)")
    p.add_argument("--context", type=_positive_int,
                   help="cache slots per request: prompt (with its images, bucketed) + max_tokens (default: the "
                   "model's max_length)")
    p.add_argument("--max-concurrent", type=_positive_int, default=64,
                   help="requests accepted at once, running or waiting; more get HTTP 429 (default 64)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may take; later it is dropped with HTTP 504 (default 600)")
    p.add_argument("--warm-text", type=int, default=128,
                   help="compile before serving the prompt lengths of one image and up to this many text tokens "
                   "(default 128; longer prompts compile when first seen)")
    p.add_argument("--allow-paths", action="store_true", help="accept local file paths as image URLs")
    p.add_argument("--image-cache", type=_count, default=1024, metavar="MB",
                   help="memory for preprocessed images, reused when the same image file comes again (a chat's "
                   "every turn, several questions of one image); 0 turns it off (default 1024)")
    p.add_argument("--encoder-cache", type=_count, default=256, metavar="MB",
                   help="device memory for the visual tokens of recent images, so that an image sent again skips "
                   "the vision encoders; 0 turns it off (default 256)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter and compute dtype")
    _add_quantize_arg(p)
    _add_template_arg(p)
    _add_tower_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="released MGM checkpoint -> mgjax Orbax checkpoint (streaming)")
    p.add_argument("src", help="released-layout checkpoint folder, or a stage-1 folder with mm_projector.bin")
    p.add_argument("out", help="new output folder")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written parameters (default bfloat16, as released)")
    p.add_argument("--scan-layers", action="store_true", help="stack decoder layers for nn.scan")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (once the new one is complete)")
    _add_template_arg(p)
    _add_tower_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="mgjax checkpoint -> released PyTorch layout (indexed safetensors)")
    p.add_argument("ckpt", help="folder written by `mgjax convert` (or by training)")
    p.add_argument("out", help="new output folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    p.add_argument("--max-shard-gb", type=_positive_float, default=5.0,
                   help="largest safetensors shard to write, in GiB (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (once the new one is complete)")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", action="store_true",
                      help="a LoRA run: the adapters merged into the weights, in the released layout")
    lora.add_argument("--lora-only", action="store_true",
                      help="a LoRA run: the adapters in PEFT's layout (adapter_config.json, adapter_model.safetensors) "
                           "and non_lora_trainables.bin, as the original's LoRA training saves them")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("plan", help="per-device memory of a training job on a mesh (nothing is allocated)")
    p.add_argument("config", help="preset name (e.g. MGM-34B-HD) or checkpoint folder; with --search, a training "
                   "CONFIG.yaml")
    p.add_argument("--mesh", default="fsdp=-1", help="e.g. fsdp=64,tensor=2 (axes data, fsdp, tensor, expert)")
    p.add_argument("--devices", type=_positive_int, help="device count (needed when an axis is -1)")
    p.add_argument("--chip", help="v4, v5e, v5p, v6e, a100-40g, a100-80g, h100, h200: say whether it fits")
    p.add_argument("--rules", default="fsdp_tp_ep", help="sharding rule preset: dp, fsdp, fsdp_tp, fsdp_tp_ep")
    p.add_argument("--stage", type=int, choices=[1, 2], help="training stage: 1 (projector and mining) or 2 "
                   "(+ the LLM); default 2")
    p.add_argument("--batch", type=_positive_int, help="global batch (default: the recipe's, 256 / 128)")
    p.add_argument("--seq", type=_positive_int, help="merged sequence length (default: tokenizer_model_max_length)")
    p.add_argument("--accum", type=_positive_int, help="gradient accumulation steps")
    p.add_argument("--remat", choices=["full", "dots", "none"], help="activation rematerialisation policy "
                   "(default full)")
    p.add_argument("--search", action="store_true", help="with a training CONFIG.yaml and --topology: compile "
                   "variants (micro_batch, remat, mesh split, loss_chunk) with the TPU compiler and print the "
                   "fastest that fits as key=value overrides for `mgjax train`")
    p.add_argument("--candidates", type=_positive_int, default=4, help="--search: variants to compile (default 4)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="--search: an override of the training config (repeat for several)")
    _add_topology_arg(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train", help="train or resume a run: mgjax train CONFIG.yaml [key=value ...]")
    p.add_argument("config", help="the run's YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted keys overriding the YAML, values in YAML syntax (optim.lr=1e-4 steps=100)")
    p.add_argument("--dry-run", action="store_true", help="only lower and compile the step for the configured "
                   "mesh and print XLA's per-device memory and FLOPs (no data, weights or steps)")
    p.add_argument("--devices", type=_positive_int, help="--dry-run: compile for N devices (fake CPU devices when "
                   "the machine has another number)")
    _add_topology_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="answer (and score) a benchmark in jitted batches; shapes: the demo's held-out set")
    p.add_argument("bench", choices=["shapes", "textvqa", "mme", "pope", "mmvet", "mmbench", "scienceqa", "mmmu",
                                     "mathvista"], help="the benchmark")
    p.add_argument("--ckpt", required=True, help="a run_dir of mgjax train, an mgjax or a released checkpoint")
    p.add_argument("--data", help="the question file (LLaVA JSONL: question_id, image, text[, category]; "
                   "mmbench: its TSV; scienceqa: LLaVA's llava_test_CQM-A.json; mmmu: its Parquet, a folder or a "
                   "glob of them; mathvista: testmini.json or its Parquet)")
    p.add_argument("--images", help="the folder the questions' image paths are relative to")
    p.add_argument("--out", help="the answer file (LLaVA answer JSONL); an existing one is resumed")
    p.add_argument("--annotations", help="ground truth for the local scorer (TextVQA: TextVQA_0.5.1_val.json; "
                   "POPE: the coco_pope_*.json folder; MME: MME_Benchmark_release_version; ScienceQA: "
                   "problems.json; MMBench dev, MMMU and MathVista carry theirs)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="questions per jitted batch (default 16)")
    p.add_argument("--limit", type=_positive_int, help="only the first N questions (a quick look)")
    p.add_argument("--max-new-tokens", type=_positive_int, help="answer length limit (default: the paper's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter and compute dtype")
    p.add_argument("--num-samples", type=_positive_int, default=256, help="shapes: held-out questions to ask")
    _add_quantize_arg(p)
    _add_tower_args(p)
    _add_inference_aot_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="training data tools")
    data = p.add_subparsers(dest="action", required=True, help="what to do: pack")
    p = data.add_parser("pack", help="LLaVA/MGM JSON + image folder -> ArrayRecord shards with the images embedded "
                                     "(read by grain and TFDS); bad records are skipped, counted and logged")
    p.add_argument("json", help="records: a JSON list or JSONL of {id, image, conversations}")
    p.add_argument("image_root", help="folder the records' image paths are relative to")
    p.add_argument("out", help="new output folder (written beside, renamed when complete)")
    p.add_argument("--shard-size", type=_positive_int, default=10000, help="records per shard (default 10000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (once the new one is complete)")
    p.set_defaults(func=cmd_data_pack)

    p = sub.add_parser("check-cluster", help="join a multi-host job and check collectives over every device")
    p.set_defaults(func=cmd_check_cluster)

    return parser


def main(argv: list[str] | None = None, *, exit_on_signal: bool = False) -> int:
    """Runs one `mgjax` command and returns its exit status: 0, 2 (bad input, one line on stderr), 130 / 143
    (Ctrl-C / SIGTERM, `interrupt.stopped`; with `exit_on_signal`, the `mgjax` command itself, the process
    exits there and then). The signals are handled from the first line on: one that lands while the parser
    or a command imports JAX ends the same way. A full disk (`DiskFull`) exits 1, with one line too."""
    name = interrupt.command_name(sys.argv[1:] if argv is None else argv)
    try:
        with interrupt.handled():
            args = build_parser().parse_args(argv)
            name = args.command
            if name in JOINING + ONE_PROCESS and not getattr(args, "dry_run", False) and jobenv.in_job():
                if name in ONE_PROCESS:
                    raise MGJaxError(f"{name} runs on one process, and this one was started as one of a job "
                                     "(MGJAX_* variables, srun or mpirun with several tasks): run it on one host only")
                from mgjax import distributed

                distributed.initialize()  # before anything touches a device
            compile_cache()
            code = args.func(args)
    except (KeyboardInterrupt, interrupt.Terminated) as e:
        code = interrupt.stopped(e, name, exit_on_signal)
    except MGJaxError as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"mgjax {name}: error: {message}", file=sys.stderr)
        code = e.exit_code
    except Exception:
        job = _job()
        if job is None:
            raise
        traceback.print_exc()
        job.failed(1, unexpected=True)
    job = _job()
    if job is not None:
        if code:
            job.failed(code, unexpected=False)
        job.finish()
    return code


def _job():
    """`mgjax.distributed` once this process has joined a job of several (by `main`, or by check-cluster on a
    TPU pod), else None; looked up, not imported, since it imports JAX."""
    job = sys.modules.get("mgjax.distributed")
    return job if job is not None and job.joined() else None
