"""Cloud TPU slices by the names users type (`v5p-64`, `v6e-256`, `v5litepod-16`, or jax's `v5p:4x4x2`): their
chips, hosts and devices, for compiling with the real TPU compiler (libtpu) on a machine without the slice.

`jax.experimental.topologies.get_topology_desc` gives the devices of a slice that is not there; a mesh over them
lowers and compiles jitted functions with libtpu's compiler, whose `memory_analysis()` and out-of-memory errors
are the chip's own (MaxText's `train_compile.py` works the same way). Nothing runs.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

from mgjax.errors import MGJaxError

GB = 1e9
INSTALL = "install libtpu, the TPU compiler, with `pip install -e '.[tpu]'` (it runs on any x86 Linux machine)"


@dataclass(frozen=True)
class Chip:
    """One TPU chip generation (Cloud TPU system-architecture pages, 2026)."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s per chip, both directions of all its links
    hbm_bytes: float  # the docs' figure; `hbm_bytes()` asks the compiler for the usable amount
    dims: int  # 3: a 3D torus (v4, v5p), 2: a 2D torus (v5e, v6e)
    cores_per_chip: int  # TensorCores, which v4-N / v5p-N count (megacore: one jax device per chip)
    single_host: int  # slices of up to this many chips are one host; larger ones have 4 chips per host


CHIPS = {
    "v4": Chip("v4", 275e12, 1200 * GB, 300 * GB, 32 * 2**30, 3, 2, 4),
    "v5p": Chip("v5p", 459e12, 2765 * GB, 1200 * GB, 95 * 2**30, 3, 2, 4),
    "v5e": Chip("v5e", 197e12, 819 * GB, 200 * GB, 16 * 2**30, 2, 1, 8),
    "v6e": Chip("v6e", 918e12, 1640 * GB, 448 * GB, 32 * 2**30, 2, 1, 8),
}
# accelerator-type prefixes as users type them -> chip
_PREFIXES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
# jax topology names spell v5e / v6e as such; libtpu refuses "v5litepod"
_NAMES = "v4-N, v5p-N (N TensorCores: v5p-8 is 4 chips), v5litepod-N / v5e-N, v6e-N (N chips), or jax's v5p:2x2x1"


@dataclass(frozen=True)
class Slice:
    """A TPU slice: chip generation, torus shape (chips per dimension) and hosts."""

    name: str  # as the user typed it
    chip: Chip
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def chips_per_host(self) -> int:
        return self.chips if self.chips <= self.chip.single_host else 4

    @property
    def hosts(self) -> int:
        return self.chips // self.chips_per_host

    @property
    def topology_name(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    def host_bounds(self) -> tuple[int, int, int]:
        """Chips per host in each dimension, as libtpu wants them."""
        if self.chips_per_host == self.chips:
            return (*self.shape, 1, 1)[:3]
        return (2, 2, 1)

    def devices(self) -> list:
        """The slice's jax devices (one per chip), from libtpu's description of the topology."""
        return list(_devices(self))

    def describe(self) -> str:
        return (f"{self.name}: {self.chips} TPU {self.chip.name} chip(s) ({self.topology_name}), {self.hosts} host(s) "
                f"of {self.chips_per_host}")


def _torus(chips: int, dims: int) -> tuple[int, ...] | None:
    """The standard slice shape of `chips` chips: from 2x2(x1), the smallest dimension doubled (the last of the
    smallest on a tie), as the Cloud TPU tables list them (v5p-64: 2x4x4, v6e-32: 4x8); None if none has it."""
    if dims == 3 and chips < 4:
        return None
    shape = [2, 2, 1] if dims == 3 else [1] * dims
    while math.prod(shape) < chips:
        i = max(j for j in range(dims) if shape[j] == min(shape))
        shape[i] *= 2
    return tuple(shape) if math.prod(shape) == chips else None


def parse_slice(text: str) -> Slice:
    """`v5p-64`, `v5litepod-16`, `v6e-8`, `v4-32` or `v5p:4x4x2` -> Slice; anything else is an MGJaxError."""
    name = text.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", name)
    if m:
        prefix, shape = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
        chip = CHIPS.get(_PREFIXES.get(prefix, ""))
        if chip is None or len(shape) != chip.dims or 0 in shape:
            raise MGJaxError(f"--topology {text!r}: not a TPU slice; give {_NAMES}")
        return Slice(text, chip, shape)
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    chip = CHIPS.get(_PREFIXES.get(m.group(1), "")) if m else None
    if chip is None:
        raise MGJaxError(f"--topology {text!r}: unknown slice; give {_NAMES}")
    n = int(m.group(2))
    chips, rest = divmod(n, chip.cores_per_chip)
    shape = _torus(chips, chip.dims) if chips and not rest else None
    if shape is None:
        raise MGJaxError(f"--topology {text!r}: no standard {chip.name} slice has {n} "
                         f"{'TensorCores' if chip.cores_per_chip > 1 else 'chips'}; give its shape the jax way, "
                         f"e.g. {chip.name}:{'x'.join(['2'] * chip.dims)}")
    return Slice(text, chip, shape)


@contextmanager
def _quiet_libtpu():
    """libtpu asks the GCE metadata server which slice it is on and, off a TPU VM, logs the failure on stderr;
    it only describes a topology here, so it is told it is a lone worker for the call. It also takes a
    machine-wide lock that would keep a second compiling process (a test worker, a second dry run) out."""
    env = (("TPU_ACCELERATOR_TYPE", "v5p-8"), ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_SKIP_MDS_QUERY", "1"),
           ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"))
    saved = {k: os.environ.get(k) for k, _ in env}
    for k, v in env:
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


@cache
def _devices(s: Slice) -> tuple:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise MGJaxError(f"--topology {s.name} compiles with the TPU compiler, which is not installed: {INSTALL}") \
            from None
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if s.chip.name == "v4" else {}
    with _quiet_libtpu():
        try:
            topo = topologies.get_topology_desc(platform="tpu", topology_name=s.topology_name,
                                                chips_per_host_bounds=s.host_bounds(), **kwargs)
        except Exception as e:  # libtpu's own error: an unsupported shape
            raise MGJaxError(f"--topology {s.name}: libtpu cannot describe {s.topology_name}: "
                             f"{' '.join(str(e).split())}") from None
    return tuple(topo.devices)


def compiler_platform_only() -> None:
    """A --topology compile needs no local accelerator: with libtpu installed and no TPU here, jax would try
    (and fail, loudly) to start a TPU backend; unless the user chose platforms, the host is the CPU."""
    import jax

    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")


_OOM = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT]?)\)|Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")
_NEED = re.compile(r"memory required for [^(]*\(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def read_oom(message: str) -> tuple[float | None, float | None] | None:
    """(bytes needed, bytes available) per chip from the TPU compiler's out-of-memory error, or None when the
    message is not one; either figure is None when the message lacks it."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    m, need = _OOM.search(message), _NEED.search(message)
    if m is None:
        return (_bytes(*need.groups()) if need else None), None
    if m.group(1) is not None:
        return (_bytes(*need.groups()) if need else None), _bytes(m.group(1), m.group(2))
    return _bytes(m.group(3), m.group(4)), _bytes(m.group(5), m.group(6))


@cache
def hbm_bytes(s: Slice) -> float:
    """Usable HBM per chip, as the compiler counts it: read from its out-of-memory error for a program that
    cannot fit (v5p 95.74G, v5e 15.75G); the docs' figure if the message ever changes shape."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(s.devices()[:1], ("x",))
    big = jax.ShapeDtypeStruct((2**40,), jnp.int8, sharding=NamedSharding(mesh, PartitionSpec()))
    try:
        with jax.set_mesh(mesh):  # whatever mesh the caller has set
            jax.jit(lambda a: a + 1).lower(big).compile()
    except Exception as e:  # noqa: BLE001 - the compiler's error is read, whatever its class
        oom = read_oom(str(e))
        if oom and oom[1]:
            return oom[1]
    return s.chip.hbm_bytes
