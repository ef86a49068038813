"""Compiling for TPU slices that are not here, with the real TPU compiler (libtpu, in the test extra), and the
figures read from the compiled programs:

- `mgjax.topology`: Cloud TPU accelerator names -> chips, torus shape, hosts; libtpu's devices for them; the
  usable HBM per chip as the compiler states it; its out-of-memory errors read.
- `mgjax.roofline`: FLOPs / bytes / collectives walked from the HLO with loop bodies multiplied out, checked
  against XLA's own cost analysis of loop-free programs and against the same program unrolled.
- `mgjax train ... --dry-run --topology`: the demo's step for v5p slices (rows per host), `fits: no` with
  exit 1 for a step no chip holds, exit 2 with one line for bad slices, meshes and a missing libtpu.
- `mgjax eval|generate ... --dry-run --topology`: the prompt pass and decode step of a tiny release.
- `attention_impl` / `moe_impl` "auto": splash through Mosaic (not interpreted) and ragged experts compiled for
  a TPU mesh for an LLM built like each released family at its release's head_dim, padded and packed rows.
"""

import dataclasses
import re
import sys

import jax
import jax.numpy as jnp
import pytest

import tiny
from helpers import GOLDEN
from mgjax.cli import main
from mgjax.config import MeshConfig
from mgjax.errors import MGJaxError
from mgjax.lm.decoder import Decoder
from mgjax.roofline import hlo_cost
from mgjax.sharding import DEFAULT_RULES, activate, make_mesh, target_platform
from mgjax.topology import hbm_bytes, parse_slice, read_oom

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("name,chip,chips,hosts,topology", [
    ("v5p-8", "v5p", 4, 1, "v5p:2x2x1"), ("v5p-64", "v5p", 32, 8, "v5p:2x4x4"),
    ("v5p-256", "v5p", 128, 32, "v5p:4x4x8"), ("v4-32", "v4", 16, 4, "v4:2x2x4"),
    ("v5litepod-16", "v5e", 16, 4, "v5e:4x4"), ("v5e-8", "v5e", 8, 1, "v5e:2x4"), ("v5e-1", "v5e", 1, 1, "v5e:1x1"),
    ("v6e-256", "v6e", 256, 64, "v6e:16x16"), ("v6e-8", "v6e", 8, 1, "v6e:2x4"),
    ("v5p:2x2x2", "v5p", 8, 2, "v5p:2x2x2"),
])
def test_slices_by_their_cloud_names(name, chip, chips, hosts, topology):
    s = parse_slice(name)
    assert (s.chip.name, s.chips, s.hosts, s.topology_name) == (chip, chips, hosts, topology)
    devices = s.devices()
    assert len(devices) == chips and len({d.process_index for d in devices}) == hosts
    assert {d.platform for d in devices} == {"tpu"}


@pytest.mark.parametrize("name,message", [("v7-8", "unknown slice"), ("v5p-6", "no standard v5p slice has 6"),
                                          ("v5e-3", "no standard v5e slice"), ("v5p:2x2", "not a TPU slice"),
                                          ("tpu", "unknown slice")])
def test_unknown_slices_are_named_errors(name, message):
    with pytest.raises(MGJaxError, match=message):
        parse_slice(name)


def test_hbm_per_chip_is_the_compilers():
    """The compiler's usable HBM (a little under the docs' for v5e: 15.75 of 16 GB)."""
    assert hbm_bytes(parse_slice("v5p-8")) / 2**30 == pytest.approx(95.74, abs=0.01)
    assert hbm_bytes(parse_slice("v5e-4")) / 2**30 == pytest.approx(15.75, abs=0.01)


def test_out_of_memory_messages_are_read():
    assert read_oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                    "(512.00G) exceeds available HBM (95.74G).") == (512 * 2**30, 95.74 * 2**30)
    assert read_oom("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
                    "Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.") == (20.5 * 2**30, 15.75 * 2**30)
    assert read_oom("INVALID_ARGUMENT: shapes do not match") is None


# --- the roofline --------------------------------------------------------------------------------------

def _mlp(x, w1, w2, k):
    h = jax.nn.gelu(x @ w1) @ w2
    y = jax.lax.conv_general_dilated(h.reshape(1, 32, 32, 32), k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(y) + jnp.sum(jnp.einsum("bd,be->de", x, x))


ARGS = (jax.ShapeDtypeStruct((1024, 256), jnp.float32), jax.ShapeDtypeStruct((256, 512), jnp.float32),
        jax.ShapeDtypeStruct((512, 32), jnp.float32), jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32))


def _flops(fn, tpu: bool = False):
    """(XLA's FLOPs, the roofline's cost) of `fn` on ARGS compiled for this CPU, or for one v5p chip (whose HLO
    has no known_trip_count: the roofline reads the loop's bounds and step)."""
    if not tpu:
        compiled = jax.jit(fn).lower(*ARGS).compile()
    else:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(parse_slice("v5p-8").devices()[:1], ("x",))
        args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, PartitionSpec())) for a in ARGS]
        with jax.set_mesh(mesh):
            compiled = jax.jit(fn).lower(*args).compile()
        assert "known_trip_count" not in compiled.as_text()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"], hlo_cost(compiled.as_text())


def test_roofline_flops_equal_xla_on_a_loop_free_program():
    """Dots, an einsum and a padded 3x3 convolution: the matmul FLOPs XLA counts (it adds the elementwise
    ones: within 2%), and exactly the analytic count of the multiply-adds that touch real inputs."""
    xla, cost = _flops(_mlp)
    convolved = sum(min(i + 1, 31) - max(i - 1, 0) + 1 for i in range(32)) ** 2  # 3x3 taps inside the 32x32 map
    exact = 2 * (1024 * 256 * 512 + 1024 * 512 * 32 + 256 * 1024 * 256) + 2 * 32 * 32 * convolved
    assert cost.flops == exact
    assert cost.flops == pytest.approx(xla, rel=0.02)
    assert cost.unknown_loops == 0 and cost.bytes > 0


@pytest.mark.parametrize("kind", ["scan", "fori_in_scan", "count_by_2"])
def test_roofline_multiplies_loop_bodies_by_their_trip_counts(kind):
    """XLA counts a loop body once; the roofline counts it as many times as it runs (nested loops too; a
    counter stepping by 2, as the TPU compiler's bidirectional windowed einsums do, runs half as often)."""
    def scanned(x, *w):  # every body depends on its carry: nothing is hoisted out of the loops
        def body(c, _):
            if kind == "scan":
                return c + _mlp(x + c, *w), None
            if kind == "count_by_2":  # i = 1, 3, 5, 7, 9
                return jax.lax.while_loop(lambda t: t[0] < 10, lambda t: (t[0] + 2, t[1] + _mlp(x + t[1], *w)),
                                          (1, c))[1], None
            return c + jax.lax.fori_loop(0, 3, lambda i, s: s + _mlp(x + s, *w), c), None
        return jax.lax.scan(body, 0.0, None, length=5)[0]

    tpu = kind == "count_by_2"
    once, one = _flops(_mlp, tpu)
    xla, cost = _flops(scanned, tpu)
    runs = {"scan": 5, "fori_in_scan": 15, "count_by_2": 25}[kind]
    assert cost.flops == pytest.approx(runs * one.flops, rel=1e-6)
    assert xla == pytest.approx(once, rel=0.05)  # XLA's figure: one body
    assert cost.unknown_loops == 0


def test_roofline_counts_splash_attention_kernels():
    """A Pallas kernel carries no FLOP count in the HLO: splash's passes are counted from q [rows, H, T, hd], causal
    (half the blocks): forward 2 matmuls, dq 3, dkv 4, of 2 H T^2 hd each; another kernel counts bytes only."""
    text = """HloModule m

ENTRY %main (q: bf16[2,4,256,128]) -> bf16[2,4,256,128] {
  %q = bf16[2,4,256,128] parameter(0)
  %splash_mha_fwd_segmented_residuals.1 = bf16[2,4,256,128] custom-call(%q, %q), custom_call_target="tpu_custom_call"
  %splash_mha_dq_segmented_no_residuals.1 = bf16[2,4,256,128] custom-call(%q, %q), custom_call_target="tpu_custom_call"
  %splash_mha_dkv_segmented_no_residuals.1 = bf16[2,4,256,128] custom-call(%q, %q), custom_call_target="tpu_custom_call"
  ROOT %other_kernel.1 = bf16[2,4,256,128] custom-call(%q), custom_call_target="tpu_custom_call"
}
"""
    per_matmul = 2 * 2 * 4 * 256 * 256 * 128 / 2
    cost = hlo_cost(text)
    assert cost.flops == (2 + 3 + 4) * per_matmul
    assert cost.bytes == (3 + 3 + 3 + 2) * 2 * 4 * 256 * 128 * 2


# --- train --dry-run --topology --------------------------------------------------------------------------

DEMO = "configs/demo/stage2.yaml"


def test_train_dry_run_for_a_v5p_slice(capsys):
    """Two hosts of 4 chips: micro_batch rows per host, so 2 x 8 rows per micro-batch; the TPU compiler's
    HBM, the roofline line, and `fits: yes` last."""
    assert main(["train", DEMO, "micro_batch=8", "global_batch=32", "--dry-run", "--topology", "v5p-16"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "8 TPU v5p chips (v5p-16, 2 host(s)" in out[0] and "2 micro-batch(es) of 16 rows" in out[0]
    assert "on tpu: attention splash (auto)" in out[1]
    assert re.fullmatch(r"fits: yes \(0\.\d\d of 95\.74 GB per chip\)", out[-1])
    assert any(line.startswith("roofline per step") and "MFU" in line for line in out)


def test_train_dry_run_that_does_not_fit_exits_1_with_the_compilers_figure(capsys):
    """A 4M-token vocabulary (2 GB of float32 embedding, its gradient and Adam moments, on one chip) cannot
    fit v5e's 15.75 GB: the compiler's verdict, one line, exit 1, no traceback."""
    code = main(["train", DEMO, "model.config={lm: {vocab_size: 4194304}}", "mesh.fsdp=1", "--dry-run",
                 "--topology", "v5e-1"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    last = captured.out.strip().splitlines()[-1]
    needed = re.fullmatch(r"fits: no \(needs ([\d.]+) of 15\.75 GB per chip\)", last)
    assert needed and float(needed.group(1)) > 15.75
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("args,message", [
    (["--topology", "v9-8"], "unknown slice"),
    (["mesh.tensor=3", "--topology", "v5p-8"], "needs a multiple of 3 devices"),
])
def test_bad_slices_and_meshes_exit_2_in_one_line(args, message, capsys):
    overrides = [a for a in args if "=" in a]
    flags = [a for a in args if "=" not in a]
    assert main(["train", DEMO, *overrides, "--dry-run", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_missing_libtpu_says_how_to_install_it(monkeypatch, capsys):
    import mgjax.topology as topology

    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
    topology._devices.cache_clear()
    assert main(["train", DEMO, "--dry-run", "--topology", "v5p-8"]) == 2
    topology._devices.cache_clear()
    err = capsys.readouterr().err.strip()
    assert "pip install -e '.[tpu]'" in err and len(err.splitlines()) == 1


# --- eval / generate --dry-run --topology -------------------------------------------------------------

def test_eval_dry_run_compiles_the_prompt_pass_and_decode_step(capsys):
    """A tiny release (the golden fixture's config) at batch 8 on a v5e-4: weights and cache per chip, both
    programs fit."""
    ckpt = str(GOLDEN / "llama_vicuna" / "MGM-7B-tiny")
    assert main(["eval", "mmvet", "--ckpt", ckpt, "--dry-run", "--topology", "v5e-4", "--batch-size", "8",
                 "--dtype", "bfloat16", "--prompt-tokens", "16", "--max-new-tokens", "32"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "4 TPU v5e chips of v5e-4" in out[0] and "batch 8" in out[0] and "cache room 32" in out[0]
    assert out[1].startswith("per chip: weights") and "KV cache" in out[1]
    assert out[2].startswith("prompt pass: compiling") and out[3].startswith("decode step: compiling")
    assert re.fullmatch(r"fits: yes \([\d.]+ of 15\.75 GB per chip\)", out[-1])


def test_generate_dry_run_needs_a_topology(capsys):
    assert main(["generate", "MGM-2B", "--dry-run"]) == 2
    assert "--topology SLICE" in capsys.readouterr().err


# --- fast paths for a TPU mesh --------------------------------------------------------------------------

RELEASED_HEAD_DIM = {"gemma": 256, "vicuna": 128, "llama_3": 128, "yi": 128, "mixtral": 128}


@pytest.mark.parametrize("family", tuple(tiny.LMS))
def test_auto_fast_paths_compile_for_a_tpu_mesh(family):
    """"auto" on a v5p mesh (fsdp 2 x tensor 2, experts over the expert axis for Mixtral): the LLM's loss
    gradient over a right-padded and a packed row compiles with splash attention as a Mosaic kernel (a TPU
    custom call, not the interpreter) at the release's head_dim, and Mixtral's experts as ragged dots."""
    config = tiny.lm(family, head_dim=RELEASED_HEAD_DIM[family])
    assert config.impls("tpu") == ("splash", "ragged") and config.impls("cpu") == ("causal", "dense")
    devices = parse_slice("v5p-8").devices()
    shape = (1, 2, 1, 2) if family == "mixtral" else (1, 2, 2, 1)
    mesh = make_mesh(MeshConfig(*shape), devices)
    ids = jnp.zeros((4, 200), jnp.int32)
    valid = jnp.arange(200)[None] < jnp.asarray([[200], [150], [200], [90]])
    segments = jnp.where(jnp.arange(200)[None] < 120, 1, 2) * valid
    positions = jnp.broadcast_to(jnp.arange(200), (4, 200))
    decoder = Decoder(config)
    params = jax.eval_shape(lambda: decoder.init(jax.random.key(0), ids, positions, valid,
                                                 method=Decoder.forward_ids)["params"])

    def loss(p):
        logits = decoder.apply({"params": p}, decoder.apply({"params": p}, ids, method=Decoder.embed), positions,
                               valid, segments)
        return jnp.sum(jnp.where(valid[..., None], logits, 0.0))

    with activate(mesh, DEFAULT_RULES):
        assert target_platform() == "tpu"
        text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert 'custom_call_target="tpu_custom_call"' in text
    if family == "mixtral":
        assert re.search(r"ragged|grouped", text, re.IGNORECASE)


def test_auto_on_this_cpu():
    """On the CPU "auto" is causal attention (the reference's math in query blocks) and the dense experts
    (the reference); a named path stays what it is named."""
    assert jax.default_backend() == "cpu" and target_platform() == "cpu"
    assert tiny.lm("mixtral").impls(target_platform()) == ("causal", "dense")
    assert tiny.lm("vicuna", attention_impl="splash", moe_impl="ragged").impls("cpu") == ("splash", "ragged")
    assert tiny.lm("vicuna").impls("gpu") == ("cudnn", "ragged")


def test_grouped_depthwise_convolution_compiles_for_a_tpu_mesh():
    """The ConvNeXt trunk with XLA's grouped depthwise convolution (the GPU/TPU form), batch over a v5e-4 mesh:
    the TPU compiler keeps it a convolution with 7x7 windows (feature groups), no 49 shifted products."""
    from mgjax.vision.convnext import ConvNextTrunk

    config = dataclasses.replace(tiny.CONVNEXT, depthwise_impl="grouped")
    mesh = make_mesh(MeshConfig(1, 4, 1, 1), parse_slice("v5e-4").devices())
    pixels = jax.ShapeDtypeStruct((4, 64, 64, 3), jnp.float32)
    trunk = ConvNextTrunk(config)
    params = jax.eval_shape(lambda: trunk.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"])
    with activate(mesh, DEFAULT_RULES):
        text = jax.jit(trunk.apply).lower({"params": params}, pixels).compile().as_text()
    assert re.search(r"convolution\(.*window=\{size=7x7.*feature_group_count=\d+", text)


def test_plan_search_prints_the_fastest_variant_that_fits(monkeypatch, capsys):
    """The variants of the demo's stage 2 for a v5e-4 (micro_batch halved / kept / doubled, remat, tensor 1 or 2,
    loss_chunk), the first `--candidates` compiled (here: the compiler's figures stood in for by a table, the
    compile itself is tested above), and the override line names the fitting variant with the shortest step."""
    import mgjax.train.search as search
    from mgjax.train.config import load_train_config

    cfg = load_train_config(DEMO, ["micro_batch=8", "global_batch=32"])
    grid = search.variants(cfg, parse_slice("v5e-4"))
    assert {v["micro_batch"] for v in grid} == {4, 8, 16} and {v["mesh.tensor"] for v in grid} == {1, 2}
    assert all(32 % v["micro_batch"] == 0 and v["mesh.fsdp"] * v["mesh.tensor"] == 4 for v in grid)

    figures = {(16, "dots", 1): (False, None), (16, "dots", 2): (True, 0.5), (16, "full", 1): (True, 0.3),
               (16, "full", 2): (True, 0.4)}

    def compiled(run, topology):
        fits, step = figures[(run.micro_batch, run.model.remat, run.mesh.tensor)]
        return {"fits": fits, "step_s": step, "bound": "compute", "peak_bytes": 2**30, "compile_s": 1.0,
                "model_flops": 1e12, "devices": 4, "chip": "v5e"} if fits else {"fits": False, "peak_bytes": 2**35}

    monkeypatch.setattr(search, "dry_run", compiled)
    assert main(["plan", DEMO, "--topology", "v5e-4", "--search", "--candidates", "4", "--set", "micro_batch=8",
                 "--set", "global_batch=32"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    tried = [line for line in out if line.startswith("  micro_batch=")]
    assert len(tried) == 4 and "does not fit (needs 32.0 of 15.8 GB per chip)" in tried[0]
    best = out[-1].removeprefix("overrides: ")
    cfg = load_train_config(DEMO, ["micro_batch=8", "global_batch=32", *best.split()])
    assert (cfg.micro_batch, cfg.model.remat, cfg.mesh.tensor, cfg.mesh.fsdp) == (16, "full", 1, 4)
    assert out[-2].startswith("best: step about 0.300 s")


@pytest.mark.parametrize("family", ["vicuna", "mixtral", "gemma"])
def test_model_flops_count_the_matmul_weights_a_token_passes(family):
    """`model_flops` against the parameter tree: 6 x (every LLM matmul weight but the embedding lookup, the
    routed k of E experts) per token + attention's 12 L H hd T, + 2 x CLIP's layer weights per patch and view."""
    from flax import traverse_util

    from mgjax.model import MGM, abstract_params
    from mgjax.plan import model_flops

    config = tiny.mgm(family, hd=family == "gemma")
    flat = traverse_util.flatten_dict(abstract_params(MGM(config)))
    size = lambda keys: sum(a.size for k, a in flat.items() if keys(k))  # noqa: E731
    lm = config.lm
    experts = size(lambda k: k[0] == "llm" and "experts" in k)
    weights = size(lambda k: k[0] == "llm" and k[-1] == "kernel" or (k[0] == "llm" and "experts" in k))
    if lm.tie_word_embeddings:  # the head is the embedding
        weights += size(lambda k: k[:2] == ("llm", "embed_tokens"))
    active = weights - experts + experts * lm.num_experts_per_tok // max(lm.num_experts, 1)
    rows, length, images = 3, 40, 2
    clip = size(lambda k: k[0] == "vision_tower" and "layers" in "/".join(k) and k[-1] == "kernel")
    patches = (config.vision.image_size // config.vision.patch_size) ** 2 + 1
    expected = (6 * active * rows * length + 12 * lm.num_layers * lm.num_heads * lm.head_dim * length * rows * length
                + 2 * clip * patches * images * config.num_views)
    assert model_flops(config, rows, length, images) == expected
