"""The memory planner on full-size configs (abstract meshes: nothing is allocated)."""

import pytest

from mgjax.cli import main
from mgjax.config import MeshConfig
from mgjax.presets import preset
from mgjax.plan import GiB, job_for, plan
from mgjax.sharding import rules_for


@pytest.mark.parametrize("name,mesh", [("MGM-34B-HD", "fsdp=32,tensor=2"), ("MGM-8x7B-HD", "fsdp=16,expert=4")])
def test_plan_full_size_on_v5p_128(name, mesh, capsys):
    """v5p-128 is 64 chips (JAX devices)."""
    assert main(["plan", name, "--mesh", mesh, "--chip", "v5p"]) == 0
    out = capsys.readouterr().out
    assert "(64 devices)" in out and "v5p HBM 95 GiB: fits" in out


def test_parameter_bytes_are_exact():
    c = preset("MGM-34B-HD")
    p = plan(c, MeshConfig(1, 64, 2, 1), 128, job_for(c), rules_for("fsdp_tp"), "v5p")
    n_llm = 34_388_917_248  # Yi-34B's published parameter count
    lm = c.lm
    per_layer = (lm.hidden_size * (lm.num_heads + 2 * lm.num_kv_heads) * lm.head_dim
                 + lm.num_heads * lm.head_dim * lm.hidden_size + 3 * lm.hidden_size * lm.intermediate_size
                 + 2 * lm.hidden_size)
    n = lm.num_layers * per_layer + 2 * lm.vocab_size * lm.hidden_size + lm.hidden_size
    assert n == n_llm
    trainable = p.rows["params (trainable)"]
    # the LLM in float32 over 128 devices, plus the small projector and mining (also float32)
    assert n * 4 / 128 <= trainable <= n * 4 / 128 + 0.05 * GiB
    assert p.rows["optimizer (AdamW m, v)"] == 2 * p.rows["gradients"] == 2 * trainable


def test_a_plan_that_does_not_fit(capsys):
    assert main(["plan", "MGM-34B-HD", "--mesh", "fsdp=8", "--chip", "v5e", "--batch", "16"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_bad_plans_exit_2(capsys):
    # MGM-13B's 40 heads do not split 16 ways (KV heads would be replicated; query heads are not)
    assert main(["plan", "MGM-13B", "--mesh", "fsdp=4,tensor=16", "--rules", "fsdp_tp"]) == 2
    assert "'heads', size 40" in capsys.readouterr().err
    # MGM-2B's single KV head is replicated over tensor=2 (this used to be refused)
    assert main(["plan", "MGM-2B", "--mesh", "fsdp=4,tensor=2", "--rules", "fsdp_tp"]) == 0
    capsys.readouterr()
    assert main(["plan", "MGM-7B", "--mesh", "fsdp=-1"]) == 2
    assert "--devices" in capsys.readouterr().err


@pytest.mark.parametrize("kind,tflops", [("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5", 459), ("TPU v5p", 459),
                                         ("TPU v6 lite", 918), ("NVIDIA A100-SXM4-80GB", 312),
                                         ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989), ("cpu", None)])
def test_peak_flops_by_device_kind(kind, tflops):
    from mgjax.plan import peak_flops

    assert peak_flops(kind) == (None if tflops is None else tflops * 1e12)
