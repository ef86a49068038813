"""Training steps over 8 CPU devices as 2 processes with 4 devices each (gloo collectives, loopback
coordinator). tests/test_multihost.py runs the same steps in its own process (8 devices) and compares
the losses.

Usage: python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json
"""

import json
import sys

from mgjax import distributed


def train_two_steps(pid: int, nproc: int) -> dict:
    """Two AdamW steps of the tiny model on a (2, 2, 2, 1) mesh over all 8 devices of the job, the towers
    frozen as in MGM's recipe (their backward would triple the compile time and prove nothing more about
    the processes); this process feeds its share of the batch rows."""
    import jax
    import jax.numpy as jnp
    import optax

    import tiny
    from mgjax.config import MeshConfig
    from mgjax.model import MGM, init_params
    from mgjax.sharding import activate, make_mesh, rules_for
    from mgjax.train.step import TrainState, make_train_step, split_params

    assert jax.device_count() == 8, jax.device_count()
    config = tiny.mgm("llama_3", small=True, lm=tiny.lm("llama_3", num_layers=1))
    module = MGM(config)
    mesh = make_mesh(MeshConfig(2, 2, 2, 1))
    rules = rules_for("fsdp_tp")
    params, frozen = split_params(init_params(module, jax.random.key(0), mesh, rules),
                                  ("llm", "mm_projector", "vlm_uni_"))
    tx = optax.adamw(1e-3)
    full = tiny.batch(config)
    rows = len(full["input_ids"]) // nproc
    data = distributed.global_batch({k: v[pid * rows:(pid + 1) * rows] for k, v in full.items()}, mesh, rules)
    step = jax.jit(make_train_step(module, tx, full["input_ids"].shape[1] - 1 + config.tokens_per_image))
    with activate(mesh, rules):
        micro = jax.tree.map(lambda x: x[None], data)  # one micro-batch
        state, metrics = step(TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), frozen, micro)
        # a second step: the first one's update must be the same everywhere too
        state, metrics2 = step(state, frozen, micro)
    return {"loss": float(metrics["loss"]), "loss2": float(metrics2["loss"]), "processes": jax.process_count()}


def main(pid: int, nproc: int, port: int, out: str):
    distributed.initialize(f"127.0.0.1:{port}", nproc, pid)
    result = train_two_steps(pid, nproc)
    if distributed.is_main_process():
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
