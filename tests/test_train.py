"""The training recipe: configs, the step (accumulation, frozen parameters, a poisoned batch), the loop
(metrics, resume to the bit, SIGTERM, damaged checkpoints, non-finite losses stopped or skipped) on a very
small demo model and synthetic data."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny
from mgjax.errors import MGJaxError
from mgjax.model import MGM, abstract_params, init_params
from mgjax.train.config import load_train_config
from mgjax.train.loop import build_model, optimizer, train
from mgjax.train.step import TrainState, make_train_step, split_params

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# The demo model shrunk further, so that a run compiles and trains in seconds.
SMALL = ["model.config={lm: {num_layers: 1, hidden_size: 64, intermediate_size: 128, head_dim: 16}, "
         "vision: {num_layers: 1}}", "global_batch=16", "micro_batch=8", "data.num_samples=64", "log_every=1",
         "data.buckets=[64, 128]"]


def small_run(run_dir, *extra) -> list[str]:
    return [f"run_dir={run_dir}", *SMALL, *extra]


def losses(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# --- configs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("stage*.yaml")
                                         if p.parent.name != "common"))
def test_every_config_loads(path):
    cfg = load_train_config(CONFIGS / path)
    assert cfg.run_dir and cfg.steps > 0
    if "stage1" in path:
        assert cfg.trainable == ("mm_projector", "vlm_uni_")
    elif "lora" in path:
        assert cfg.trainable == () and cfg.model.lora is not None
    else:
        assert cfg.trainable == ("llm", "mm_projector", "vlm_uni_")


def test_released_recipe_hyperparameters():
    """docs/mgm_spec.md section 9: lr, global batch, warm-up; Mixtral and Yi at 1e-5 with 2x for the
    projector and mining; HD at max length 4096."""
    s1, s2 = (load_train_config(CONFIGS / "mgm" / "MGM-7B" / f"stage{i}.yaml") for i in (1, 2))
    assert (s1.optim.lr, s1.global_batch, s2.optim.lr, s2.global_batch) == (1e-3, 256, 2e-5, 128)
    assert s1.optim.warmup_ratio == s2.optim.warmup_ratio == 0.03 and s2.optim.weight_decay == 0.0
    for name in ("MGM-8x7B", "MGM-34B-HD"):
        cfg = load_train_config(CONFIGS / "mgm" / name / "stage2.yaml")
        assert cfg.optim.lr == 1e-5 and cfg.optim.lr_multipliers == {"mm_projector": 2.0, "vlm_uni_": 2.0}
    assert load_train_config(CONFIGS / "mgm" / "MGM-13B-HD" / "stage2.yaml").data.buckets[-1] == 4096
    assert s1.model.loss_chunk == s2.model.loss_chunk == 512


def test_fast_path_switches_reach_the_model(tmp_path):
    """model.attention_impl / loss_chunk / depthwise_impl / moe_impl end up in the MGM config the step runs."""
    cfg = load_train_config(CONFIGS / "demo" / "stage2.yaml", ["model.attention_impl=splash", "model.loss_chunk=64",
                                                                "model.depthwise_impl=grouped"])
    config = build_model(cfg, tmp_path).config
    assert (config.lm.attention_impl, config.lm.loss_chunk, config.vision_aux.depthwise_impl) == \
        ("splash", 64, "grouped")


def test_overrides_and_config_errors(tmp_path):
    cfg = load_train_config(CONFIGS / "demo" / "stage2.yaml", ["optim.lr=1e-4", "data.buckets=[32, 64]", "steps=7"])
    assert (cfg.optim.lr, cfg.data.buckets, cfg.steps, cfg.data.stage) == (1e-4, (32, 64), 7, 2)
    assert cfg.model.preset == "demo"  # from stage1.yaml through `base:`
    for bad, culprit in ((["optim.lrr=1"], "unknown key optim.lrr"), (["steps=abc"], "steps = 'abc' should be int"),
                         (["steps"], "write key=value"), (["model.remat=some"], "none|dots|full"),
                         (["model.moe_impl=sparse"], "dense|ragged"),
                         (["model.attention_impl=flash"], "xla|causal|cudnn|splash"),
                         (["model.loss_chunk=-1"], "must be >= 0"), (["model.depthwise_impl=fft"], "shifted|grouped")):
        with pytest.raises(MGJaxError, match=culprit):
            load_train_config(CONFIGS / "demo" / "stage2.yaml", bad)
    broken = tmp_path / "x.yaml"
    broken.write_text("steps: [1,\n")
    with pytest.raises(MGJaxError, match="invalid YAML"):
        load_train_config(broken)


# --- the step --------------------------------------------------------------------------------------

def _setup(trainable=("llm", "mm_projector", "vlm_uni_")):
    config = tiny.mgm("vicuna", small=True, lm=tiny.lm("vicuna", num_layers=1))
    module = MGM(config)
    params = init_params(module, jax.random.key(0))
    return config, module, *split_params(params, trainable)


def test_accumulation_equals_one_big_batch_and_a_poisoned_one_changes_nothing():
    """Two micro-batches of 4 rows give the update of one batch of 8 (token-weighted mean). A batch with a
    NaN pixel leaves the parameters and the optimizer state (momentum) as they were, and says so."""
    config, module, train_p, frozen = _setup()
    data = tiny.batch(config, rows=8)
    data["labels"][:4, 5:] = -100  # unequal supervised tokens per half: a mean of means would differ
    tx = optax.sgd(1.0, momentum=0.9)  # the first step of momentum SGD is plain SGD's
    length = data["input_ids"].shape[1] - 1 + config.tokens_per_image
    step = jax.jit(make_train_step(module, tx, length))
    state = TrainState(jnp.zeros((), jnp.int32), train_p, tx.init(train_p))
    big, m_big = step(state, frozen, {k: v[None] for k, v in data.items()})
    halves = {k: np.stack([v[:4], v[4:]]) for k, v in data.items()}
    acc, m_acc = step(state, frozen, halves)
    assert abs(float(m_big["loss"]) - float(m_acc["loss"])) < 1e-6
    assert int(m_big["tokens"]) == int(m_acc["tokens"])
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(big.params), jax.tree.leaves(acc.params)))
    assert diff < 1e-5  # float32 sums in another order
    assert int(m_acc["nonfinite"]) == 0

    halves["images"][1, 0, 0, 0, 0] = np.nan
    poisoned, m = step(acc, frozen, halves)
    assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
    assert int(poisoned.step) == int(acc.step) + 1
    for a, b in zip(jax.tree.leaves((acc.params, acc.opt_state)), jax.tree.leaves((poisoned.params,
                                                                                    poisoned.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_frozen_parameters_have_no_optimizer_state_and_stay():
    config, module, train_p, frozen = _setup(("mm_projector", "vlm_uni_"))
    assert set(train_p) == {"mm_projector", "vlm_uni_query_projector", "vlm_uni_aux_projector", "vlm_uni_val_projector"}
    cfg = load_train_config(CONFIGS / "demo" / "stage1.yaml")
    tx = optimizer(cfg, train_p)
    opt_state = tx.init(train_p)
    n_train = sum(x.size for x in jax.tree.leaves(train_p))
    n_opt = sum(x.size for x in jax.tree.leaves(opt_state))
    assert n_opt <= 2 * n_train + 16  # Adam's two moments and counters: nothing for the frozen LLM and towers
    data = tiny.batch(config)
    step = jax.jit(make_train_step(module, tx, data["input_ids"].shape[1] - 1 + config.tokens_per_image))
    state = TrainState(jnp.zeros((), jnp.int32), train_p, opt_state)
    before = jax.tree.map(np.asarray, frozen)
    for _ in range(3):
        state, metrics = step(state, frozen, {k: v[None] for k, v in data.items()})
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(frozen)))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(train_p), jax.tree.leaves(state.params)))


@pytest.mark.parametrize("kind,mesh", [("gemma", (2, 2, 2, 1))])  # the expert axis: test_sharding (forward, grads)
def test_sharded_step_equals_the_single_device_step(kind, mesh):
    """Steps of two accumulated micro-batches on 8 fake devices (data, fsdp, tensor) equal the same steps
    on one device: AdamW's losses and gradient norms, and SGD's parameters (an update proportional to
    the gradient; Adam's turns the rounding noise of a gradient that is zero in exact arithmetic, a key
    bias's, into a full-size step either way)."""
    from mgjax.config import MeshConfig
    from mgjax.model import abstract_params
    from mgjax.sharding import activate, batch_sharding, make_mesh, param_shardings, rules_for

    config = tiny.mgm(kind, small=True, lm=tiny.lm(kind, num_layers=1))
    module = MGM(config)
    trainable = ("llm", "mm_projector", "vlm_uni_")
    train_p, frozen = split_params(init_params(module, jax.random.key(0)), trainable)
    data = tiny.batch(config, rows=16)  # two micro-batches of 8 rows: one per batch shard
    micro = {k: np.stack([v[:8], v[8:]]) for k, v in data.items()}
    length = data["input_ids"].shape[1] - 1 + config.tokens_per_image
    m, rules = make_mesh(MeshConfig(*mesh)), rules_for("fsdp_tp_ep")
    sh_train, sh_frozen = split_params(param_shardings(abstract_params(module, boxed=True), m, rules), trainable)
    placed = {k: jax.device_put(v, jax.sharding.NamedSharding(
        m, jax.sharding.PartitionSpec(None, *batch_sharding(m, v.ndim - 1, rules).spec))) for k, v in micro.items()}

    def run(tx, sharded: bool, steps: int):
        params = jax.device_put(train_p, sh_train) if sharded else train_p
        state = TrainState(jnp.zeros((), jnp.int32), params, jax.jit(tx.init)(params))
        step = jax.jit(make_train_step(module, tx, length))
        args = (jax.device_put(frozen, sh_frozen), placed) if sharded else (frozen, micro)
        metrics = []
        with activate(m, rules) if sharded else contextlib.nullcontext():
            for _ in range(steps):
                state, out = step(state, *args)
                metrics.append(out)
        return state, metrics

    adamw = optimizer(load_train_config(CONFIGS / "demo" / "stage2.yaml", ["optim.warmup_ratio=0"]), train_p)
    (_, got), (_, ref) = run(adamw, True, 3), run(adamw, False, 3)
    for a, b in zip(got, ref):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-5 * abs(float(b["loss"]))
        assert abs(float(a["grad_norm"]) - float(b["grad_norm"])) <= 1e-4 * float(b["grad_norm"])
    (sgd_sharded, _), (sgd_ref, _) = run(optax.sgd(0.1), True, 2), run(optax.sgd(0.1), False, 2)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sgd_sharded.params))  # really sharded
    scale = max(float(np.abs(np.asarray(y) - np.asarray(p)).max())
                for y, p in zip(jax.tree.leaves(sgd_ref.params), jax.tree.leaves(train_p)))
    for x, y in zip(jax.tree.leaves(sgd_sharded.params), jax.tree.leaves(sgd_ref.params), strict=True):
        assert float(np.abs(np.asarray(x) - np.asarray(y)).max()) <= 1e-5 * scale + 1e-7


def test_lr_groups_and_schedule():
    cfg = load_train_config(CONFIGS / "mgm" / "MGM-34B" / "stage2.yaml", ["steps=100"])
    from mgjax.train.loop import schedule
    lr = schedule(cfg)
    assert float(lr(0)) == 0.0 and abs(float(lr(3)) - 1e-5) < 1e-12 and float(lr(100)) < 1e-9  # 3% warm-up, cosine
    _, _, train_p, _ = _setup()
    tx = optimizer(cfg, train_p)
    grads = jax.tree.map(jnp.ones_like, train_p)
    state = tx.init(train_p)
    for _ in range(4):  # past the warm-up: Adam's first steps move each weight by about lr
        updates, state = tx.update(grads, state, train_p)
    size = lambda tree: max(float(jnp.abs(u).max()) for u in jax.tree.leaves(tree))  # noqa: E731
    assert abs(size(updates["mm_projector"]) / size(updates["llm"]) - 2.0) < 1e-3


# --- the loop --------------------------------------------------------------------------------------

def test_loss_falls_metrics_and_tensorboard(tmp_path):
    cfg = load_train_config(CONFIGS / "demo" / "stage2.yaml",
                            small_run(tmp_path / "run", "steps=12", "checkpoint_every=6", "optim.lr=3e-3",
                                      "model.stage1=null"))
    result = train(cfg)
    assert result["step"] == 12 and not result["stopped"]
    rows = losses(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_s"} <= set(rows[0])
    assert np.mean([r["loss"] for r in rows[-3:]]) < np.mean([r["loss"] for r in rows[:3]]) - 0.3
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [6, 12]


def test_dry_run_compiles_the_step_for_the_mesh(tmp_path, capfd):
    """`--dry-run`: the step compiled for the 8 devices of the test process (in-process) and for 2 fake
    devices (a child process); XLA's argument bytes per device equal what the layout of the state, frozen
    parameters and batch implies; nothing is written to the run dir."""
    from mgjax.cli import main
    from mgjax.plan import model_flops
    from mgjax.sharding import make_mesh, param_shardings, rules_for
    from mgjax.train.aot import abstract_batch, dry_run
    from mgjax.train.loop import abstract_state, build_model

    args = small_run(tmp_path / "run", "trainable=[mm_projector, vlm_uni_, llm]")
    r = dry_run(load_train_config(CONFIGS / "demo" / "stage1.yaml", args))
    assert r["devices"] == 8 and r["mesh"]["fsdp"] == 8 and (r["micro_batches"], r["rows"]) == (2, 8)
    assert (r["text_len"], r["merged_len"]) == (128, 192)  # 128 - 1 + 16 visual tokens -> bucket 192
    assert r["model_flops"] == model_flops(build_model(load_train_config(CONFIGS / "demo" / "stage1.yaml", args),
                                                       tmp_path / "tok").config, 16, 192, 16)
    assert r["params"] > r["trainable"] > 0
    # What the arguments occupy per device: every leaf's shard (fsdp-split parameters and Adam moments,
    # the batch over the batch axes).
    cfg = load_train_config(CONFIGS / "demo" / "stage1.yaml", args)
    module = MGM(build_model(cfg, tmp_path / "tok").config)
    mesh, rules = make_mesh(cfg.mesh), rules_for(cfg.rules)
    shardings = param_shardings(abstract_params(module, boxed=True), mesh, rules)
    state, frozen = abstract_state(cfg, module, optimizer(cfg, split_params(shardings, cfg.trainable)[0]), mesh,
                                   shardings)
    def per_device(tree):
        return sum(np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))

    assert r["argument_bytes"] == per_device((state, frozen, abstract_batch(cfg, module.config, mesh, rules, 128)))
    assert r["temp_bytes"] > 0
    # Adam's two moments are split like their parameters (they once came out replicated on every device)
    assert per_device(state.opt_state) <= 2 * per_device(state.params) + 64
    assert not (tmp_path / "run").exists()
    with pytest.raises(MGJaxError, match="micro_batch 4 x 1 host"):  # 4 rows over 8 batch shards
        dry_run(load_train_config(CONFIGS / "demo" / "stage1.yaml", [*args, "micro_batch=4", "global_batch=8"]))

    assert main(["train", str(CONFIGS / "demo" / "stage1.yaml"), *args, "--dry-run", "--devices", "2"]) == 0
    out = capfd.readouterr()
    assert "2 fake CPU devices" in out.err and "for 2 cpu device(s), mesh {'data': 1, 'fsdp': 2" in out.out
    assert "per device: arguments" in out.out and not (tmp_path / "run").exists()


@contextlib.contextmanager
def _sigterm_after_step(monkeypatch, at: int):
    """A real SIGTERM to this process as soon as the loop has logged step `at`: the signal arrives at the same
    point of every run (a timer thread watching metrics.jsonl raced the loop on a loaded machine)."""
    from mgjax.train.tensorboard import EventWriter

    scalars = EventWriter.scalars

    def scalars_then_sigterm(self, step, values, wall_time=None):
        scalars(self, step, values, wall_time)
        if step == at:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(EventWriter, "scalars", scalars_then_sigterm)
        yield


@pytest.mark.parametrize("adapt", ["full", "qlora"])
def test_resume_after_sigterm_is_bitwise(tmp_path, capsys, monkeypatch, adapt):
    """Interrupted by SIGTERM (saved where it stopped) and re-run: the same losses, bit for bit, as a run
    never interrupted; the data order included (the iterator state is in the checkpoint), the frozen
    parameters too when their folder was lost (rebuilt from the run's config). QLoRA: LoRA adapters (under
    dropout) on an int8 LLM, the adapters alone in the checkpoint, the int8 weights in frozen/."""
    steps = 8 if adapt == "full" else 5
    args = [f"steps={steps}", "checkpoint_every=100", "model.stage1=null"]
    if adapt == "qlora":
        args += ["model.lora={rank: 4, alpha: 8, dropout: 0.1}", "model.quantize=int8", "trainable=[]"]
    whole = train(load_train_config(CONFIGS / "demo" / "stage2.yaml", small_run(tmp_path / "a", *args)))
    assert whole["step"] == steps
    with _sigterm_after_step(monkeypatch, 3):
        cut = train(load_train_config(CONFIGS / "demo" / "stage2.yaml", small_run(tmp_path / "b", *args)))
    assert cut["stopped"] and 3 <= cut["step"] < steps
    assert f"saved step {cut['step']}" in capsys.readouterr().err
    # The frozen towers are written once beside the steps, not in them; a lost copy is rebuilt on resume.
    assert (tmp_path / "b" / "frozen").is_dir()
    assert not list((tmp_path / "b" / "checkpoints").glob("*/frozen"))
    if adapt == "qlora":
        from flax import traverse_util

        from mgjax.checkpoint import saved_shapes

        frozen = traverse_util.flatten_dict(saved_shapes(tmp_path / "b" / "frozen"))
        kernels = {p: a.dtype for p, a in frozen.items() if p[0] == "llm" and p[-1] == "kernel"}
        assert kernels and set(kernels.values()) == {np.dtype(np.int8)}
        saved = (next((tmp_path / "b" / "checkpoints").iterdir()) / "state" / "_METADATA").read_text()
        assert "lora_a" in saved and "kernel" not in saved  # the step holds the adapters, not the LLM
    shutil.rmtree(tmp_path / "b" / "frozen")
    resumed = train(load_train_config(CONFIGS / "demo" / "stage2.yaml", small_run(tmp_path / "b", *args)))
    assert resumed["step"] == steps
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    if adapt == "qlora":  # --merge-lora: the int8 weights dequantised, the adapters merged: the run's logits
        import dataclasses

        import mgjax
        from helpers import assert_close
        from mgjax.convert.export import export
        from mgjax.convert.readers import Checkpoint
        from mgjax.convert.source import Source

        export(tmp_path / "a", tmp_path / "merged", merge_lora=True)
        run = mgjax.load_pretrained(tmp_path / "a")
        assert run.config.lm.quant == "int8"
        plain = MGM(run.config.plain())  # the demo's towers have no folders to load the export's config from
        params = Source(plain.config, Checkpoint.from_folder(tmp_path / "merged")).load(abstract_params(plain),
                                                                                        jnp.float32)
        merged = dataclasses.replace(run, config=plain.config, module=plain, params=params, _jitted={})
        batch = tiny.batch(run.config, rows=2)
        logits = [np.asarray(m.logits(batch["input_ids"], batch["images"], batch["images_aux"],
                                      batch["attention_mask"])) for m in (run, merged)]
        assert_close(logits[1], logits[0], 1e-5, "QLoRA run merged")


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    args = small_run(tmp_path / "run", "steps=4", "checkpoint_every=2", "model.stage1=null")
    train(load_train_config(CONFIGS / "demo" / "stage2.yaml", args))
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.rmtree(next(p for p in (ckpts / "4" / "state").iterdir() if p.is_dir()))  # a kill mid-copy, say
    # A longer run resumes from step 2, the newest readable one, and replays steps 3 and 4.
    result = train(load_train_config(CONFIGS / "demo" / "stage2.yaml", [*args, "steps=5"]))
    assert result["step"] == 5
    assert "unreadable" in caplog.text
    assert [r["step"] for r in losses(tmp_path / "run")] == [1, 2, 3, 4, 5]  # 3 and 4 once


def test_abandoned_reads_of_a_damaged_checkpoint_are_not_reported(monkeypatch):
    """The reads Orbax abandons when one array of a step is unreadable are finalised later, each printed with its
    TensorStore spec (600 tracebacks for the demo's state in the test above): dropped once a load has failed,
    any other unraisable exception still reported."""
    import sys
    import types

    from mgjax.checkpoint import ABANDONED_READ, quiet_abandoned_reads

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    quiet_abandoned_reads()
    quiet_abandoned_reads()  # a second failed load adds no second filter
    for message in (f"{ABANDONED_READ}: (slice(0, 64, 1),). See full TensorStore details: ...", "something else"):
        sys.unraisablehook(types.SimpleNamespace(exc_value=Exception(message)))
    assert [str(u.exc_value) for u in seen] == ["something else"]


def test_small_replicated_leaves_are_saved_whole_by_one_replica(tmp_path, caplog):
    """Replica-parallel saving slices each replicated shard among its replicas with a program compiled per
    shape (200 compiles for one tiny LoRA run): below 1 MiB a part, one replica writes the shard whole."""
    import logging

    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from mgjax.train.checkpoints import RunCheckpoints

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    state = {"norm": jax.device_put(jnp.arange(4096, dtype=jnp.float32), NamedSharding(mesh, PartitionSpec()))}
    ckpts = RunCheckpoints(tmp_path, every=1, keep=1)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        ckpts.save(1, state, {"position": 0})
        ckpts.wait()
    assert "jit(slice)" not in caplog.text
    step, restored, data = ckpts.restore_latest(jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state))
    ckpts.close()
    assert step == 1 and np.array_equal(restored["norm"], state["norm"]) and data == {"position": 0}


def test_stage2_starts_from_the_stage1_run(tmp_path, capsys):
    """Stage 2 takes the projector and mining of a stage-1 run (all of which that run trained, so none
    of them sits in its frozen part); at lr 0 they come out of stage 2 unchanged. Stage 2 has another
    seed, so its own random start differs."""
    import mgjax

    train(load_train_config(CONFIGS / "demo" / "stage1.yaml",
                            small_run(tmp_path / "s1", "steps=2", "checkpoint_every=2", "data.buckets=[32, 64]")))
    train(load_train_config(CONFIGS / "demo" / "stage2.yaml",
                            small_run(tmp_path / "s2", "steps=1", "optim.lr=0", "seed=1",
                                      f"model.stage1={tmp_path / 's1'}")))
    assert f"projector and mining of {tmp_path / 's1'} (step 2)" in capsys.readouterr().err
    s1, s2 = (mgjax.load_pretrained(tmp_path / r, dtype="float32").params for r in ("s1", "s2"))
    for top in ("mm_projector", "vlm_uni_query_projector", "vlm_uni_aux_projector", "vlm_uni_val_projector"):
        for a, b in zip(jax.tree.leaves(s1[top]), jax.tree.leaves(s2[top]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(s1["llm"]["embed_tokens"]["embedding"]),
                              np.asarray(s2["llm"]["embed_tokens"]["embedding"]))


def test_a_run_exports_to_the_released_layout_and_starts_another(tmp_path):
    """A run from a released checkpoint (model.init), exported with `mgjax export RUN OUT`: a released folder
    whose config.json is the release's, updated with the run's model, and whose tensors are the run's
    parameters, bit for bit. A run with model.init = that run starts from its parameters."""
    import mgjax
    from helpers import GOLDEN
    from mgjax.cli import main

    case = GOLDEN / "llama_vicuna"
    args = ["steps=1", "model.preset=null", "model.tokenizer=null", f"model.init={case / 'MGM-7B-tiny'}",
            "model.stage1=null", "global_batch=8", "micro_batch=8", "data.num_samples=16", "data.buckets=[64, 128]"]
    train(load_train_config(CONFIGS / "demo" / "stage2.yaml", [f"run_dir={tmp_path / 'run'}", *args]))
    shutil.copytree(case / "model_zoo", tmp_path / "model_zoo")  # the tower folders config.json names
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    hf = json.loads((tmp_path / "exported" / "config.json").read_text())
    released = json.loads((case / "MGM-7B-tiny" / "config.json").read_text())
    assert hf["model_type"] == "mgm" and hf["bos_token_id"] == released["bos_token_id"]
    run = mgjax.load_pretrained(tmp_path / "run", dtype="float32")
    exported = mgjax.load_pretrained(tmp_path / "exported", dtype="float32")
    assert exported.config == run.config and exported.tokenizer.bos_token_id == 1
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(run.params), jax.tree.leaves(exported.params),
                            strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))

    train(load_train_config(CONFIGS / "demo" / "stage2.yaml",
                            [f"run_dir={tmp_path / 'next'}", *args, f"model.init={tmp_path / 'run'}", "optim.lr=0"]))
    following = mgjax.load_pretrained(tmp_path / "next", dtype="float32")
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(following.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_poisoned_batch_stops_the_run_or_is_skipped_when_asked(tmp_path, monkeypatch, capsys):
    """A batch whose images hold a NaN (step 3): the run stops naming the step, the batch's sample ids and the
    checkpoint to resume from (step 2, whole); the same command with skip_nonfinite=1 resumes from it, skips
    that batch (counted in metrics.jsonl) and finishes."""
    from mgjax.data.pipeline import Batcher

    assemble, poison = Batcher.assemble, {"calls": 0, "ids": None}

    def poisoned(self, rows):
        out = assemble(self, rows)
        poison["calls"] += 1
        ids = out["sample_ids"].tolist()
        if poison["ids"] == ids or poison["ids"] is None and poison["calls"] == 5:  # 2 micro-batches a step
            poison["ids"] = ids
            out["images"][0, 0, 0, 0] = np.nan
        return out

    monkeypatch.setattr(Batcher, "assemble", poisoned)
    args = small_run(tmp_path / "run", "steps=4", "checkpoint_every=2", "model.stage1=null")
    with pytest.raises(MGJaxError, match="step 3: the loss or gradient is not finite") as e:
        train(load_train_config(CONFIGS / "demo" / "stage2.yaml", args))
    assert f"last checkpoint is step 2 in {tmp_path / 'run' / 'checkpoints'}" in str(e.value)
    assert "skip_nonfinite=1" in str(e.value) and ", ".join(poison["ids"]) in str(e.value)
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [2]

    result = train(load_train_config(CONFIGS / "demo" / "stage2.yaml", [*args, "skip_nonfinite=1"]))
    assert result["step"] == 4 and "skipped the batch" in capsys.readouterr().err
    rows = losses(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2].keys() == {"step", "nonfinite_skipped", "sample_ids"} and rows[2]["nonfinite_skipped"] == 1
    assert set(poison["ids"]) < set(rows[2]["sample_ids"])  # the step's two micro-batches
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
