"""A per-step roofline from a compiled program: FLOPs, HBM bytes and collective bytes per device with every
loop body multiplied by its trip count, and the step time a chip's peak FLOP/s, HBM bandwidth and ICI
bandwidth allow.

XLA's `cost_analysis()` counts a while loop's body once, so for scanned layers and accumulated micro-batches it
is a fraction of the step. Here the optimized HLO text is walked instead: each computation's own cost, a while
loop's body and condition times its trip count (read from `known_trip_count`, or from the condition's `i < N`
against the loop's initial counter), calls and async wrappers into their callees, a conditional's dearest
branch. Per instruction, as XLA's cost analysis does it: a fusion or op reads its operands and writes its
result (HBM bytes); FLOPs are 2 x multiply-adds of the dots and convolutions (inside fusions too); a
collective's payload is its result for all-gather / all-reduce / all-to-all / collective-permute and its
operand for reduce-scatter. A Pallas kernel (custom call) carries no FLOP count: splash attention's
(`splash_mha_fwd*`, `*_dq*`, `*_dkv*`, causal: half the blocks) are counted from its largest operand,
q / k / v [(rows,) H, T, hd]; other kernels count their bytes only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
          "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
          "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(")
_INSTR = re.compile(r"^\s+(ROOT )?%([\w.\-]+) = ")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "iota", "opt-barrier"}


@dataclass
class Cost:
    """Per device: FLOPs, HBM bytes read and written, collective payload bytes (by kind)."""

    flops: float = 0.0
    bytes: float = 0.0
    collectives: dict = field(default_factory=dict)
    unknown_loops: int = 0  # while loops whose trip count could not be read (counted once)

    @property
    def collective_bytes(self) -> float:
        return sum(self.collectives.values())

    def add(self, other: "Cost", times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.bytes += times * other.bytes
        for k, v in other.collectives.items():
            self.collectives[k] = self.collectives.get(k, 0.0) + times * v
        self.unknown_loops += other.unknown_loops


@dataclass
class _Instr:
    name: str
    shape: str  # the result type text
    opcode: str
    operands: list[str]
    args: str  # the text inside the parentheses (a constant's value, a parameter's number)
    attrs: str
    root: bool = False


def _split_type(rest: str) -> tuple[str, str]:
    """'(a, b) op(...)' or 'f32[2]{0} op(...)' -> (type, remainder)."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    i = rest.find(" ")
    return rest[:i], rest[i + 1:]


def _operands(text: str) -> tuple[list[str], str, str]:
    """'(x, f32[2] %y), attrs' -> (['x', 'y'], 'x, f32[2] %y', attrs): operand names, the text inside, what
    follows."""
    depth, end = 0, len(text)
    for i, c in enumerate(text):
        depth += c in "({["
        depth -= c in ")}]"
        if depth == 0:
            end = i
            break
    names = re.findall(r"%([\w.\-]+)", text[:end])
    return names, text[1:end], text[end + 1:]


def array_bytes(shape: str) -> float:
    """Bytes of every array in a type text (a tuple's elements summed; layouts and tiling ignored)."""
    return sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _ARRAY.findall(shape))


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def parse_hlo(text: str) -> tuple[dict[str, list[_Instr]], str]:
    """HLO module text -> ({computation: instructions}, entry computation name)."""
    comps: dict[str, list[_Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            current = comps.setdefault(h.group(2), [])
            if h.group(1):
                entry = h.group(2)
            continue
        m = _INSTR.match(line)
        if m is None or current is None:
            continue
        shape, rest = _split_type(line[m.end():])
        opcode, _, args = rest.partition("(")
        operands, inner, attrs = _operands("(" + args)
        current.append(_Instr(m.group(2), shape, opcode.strip(), operands, inner, attrs, bool(m.group(1))))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=%([\w.\-]+)", attrs)
    return m.group(1) if m else None


class _Walker:
    def __init__(self, comps: dict[str, list[_Instr]]):
        self.comps = comps
        self.shapes = {i.name: i.shape for instrs in comps.values() for i in instrs}
        self.defs = {i.name: i for instrs in comps.values() for i in instrs}
        self.memo: dict[tuple[str, bool], Cost] = {}

    def flops(self, i: _Instr) -> float:
        out = math.prod(_dims(i.shape))
        if i.opcode == "dot":
            lhs = _dims(self.shapes.get(i.operands[0], ""))
            m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attrs)
            k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
            return 2.0 * out * k
        if i.opcode == "convolution":
            return _conv_flops(i, _dims(self.shapes.get(i.operands[0], "")), _dims(self.shapes.get(i.operands[1], "")))
        return 0.0

    def kernel_flops(self, i: _Instr) -> float:
        """FLOPs of a splash attention kernel: 2 H T^2 hd per matmul of its pass (forward 2: Q K^T and P V;
        dq 3: S, dP, dQ; dkv 4: S, dP, dV, dK), halved by the causal mask's skipped blocks."""
        name = i.name.split(".")[0]
        passes = 4 if "_dkv" in name else 3 if "_dq" in name else 2 if "_fwd" in name else 0
        if not name.startswith("splash_mha") or not passes:
            return 0.0
        q = max((_dims(self.shapes.get(o, "")) for o in i.operands), key=math.prod, default=[])
        if len(q) < 3:
            return 0.0
        *heads, t, hd = q  # [(rows,) H, T, hd]
        return passes * 2.0 * math.prod(heads) * t * t * hd / 2

    def trips(self, i: _Instr) -> int | None:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', i.attrs)
        if m:
            return int(m.group(1))
        cond = self.comps.get(_attr(i.attrs, "condition") or "", [])
        root = cond[-1] if cond else None
        consts = {c.name: c for c in cond if c.opcode == "constant"}
        if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs:
            return None
        bound = next((consts[o] for o in root.operands if o in consts), None)
        counter = next((self.defs.get(o) for o in root.operands if o not in consts), None)
        if bound is None or counter is None or counter.opcode != "get-tuple-element":
            return None
        index = int(re.search(r"index=(\d+)", counter.attrs).group(1))
        start = 0
        init = self.defs.get(i.operands[0]) if i.operands else None
        if init is not None and init.opcode == "tuple" and index < len(init.operands):
            first = self.defs.get(init.operands[index])
            start = _constant(first) if first is not None and first.opcode == "constant" else 0
        return max(0, -(-(_constant(bound) - start) // self.step(i, index)))

    def step(self, i: _Instr, index: int) -> int:
        """How much the body adds to loop counter `index` per trip: 1 unless its root sets it to counter + c
        (the TPU compiler's bidirectional windowed einsums count by 2)."""
        body = self.comps.get(_attr(i.attrs, "body") or "", [])
        root = next((x for x in body if x.root), None)
        if root is None or root.opcode != "tuple" or index >= len(root.operands):
            return 1
        update = self.defs.get(root.operands[index])
        if update is None or update.opcode != "add":
            return 1
        constants = [self.defs[o] for o in update.operands if o in self.defs and self.defs[o].opcode == "constant"]
        return max(1, _constant(constants[0])) if len(constants) == 1 else 1

    def cost(self, comp: str, fused: bool = False) -> Cost:
        """Cost of one run of `comp`; in a fused computation only FLOPs and collectives count (bytes are the
        fusion's)."""
        key = (comp, fused)
        if key in self.memo:
            return self.memo[key]
        total = Cost()
        for i in self.comps.get(comp, []):
            op = i.opcode
            if op == "fusion":
                total.add(self.cost(_attr(i.attrs, "calls"), fused=True))
            elif op == "while":
                n = self.trips(i)
                if n is None:
                    total.unknown_loops += 1
                for part in ("body", "condition"):
                    total.add(self.cost(_attr(i.attrs, part)), n if n is not None else 1)
                continue
            elif op == "conditional":
                names = re.findall(r"%([\w.\-]+)", i.attrs.split("branch_computations=")[-1].split("}")[0]) \
                    if "branch_computations" in i.attrs else \
                    [_attr(i.attrs, "true_computation"), _attr(i.attrs, "false_computation")]
                branches = [self.cost(n) for n in names if n]
                if branches:
                    total.add(max(branches, key=lambda c: (c.flops, c.bytes)))
                continue
            elif op in ("call", "async-start") or (op.endswith("-start") and _attr(i.attrs, "calls")):
                total.add(self.cost(_attr(i.attrs, "calls") or _attr(i.attrs, "to_apply"), fused))
                continue
            total.flops += self.kernel_flops(i) if op == "custom-call" else self.flops(i)
            if op in _FREE or op.endswith("-done") or op.endswith("-update"):
                continue
            kind = op.removesuffix("-start")
            if fused and kind not in COLLECTIVES:  # the TPU compiler fuses collectives too: they still move
                continue
            operand_bytes = sum(array_bytes(self.shapes.get(o, "")) for o in i.operands)
            if kind in COLLECTIVES:
                payload = operand_bytes if kind == "reduce-scatter" else array_bytes(i.shape)
                if op.endswith("-start") and i.shape.startswith("("):  # (operands, result[, context])
                    payload = min(payload, operand_bytes) if kind == "all-reduce" else payload - operand_bytes
                total.collectives[kind] = total.collectives.get(kind, 0.0) + max(payload, 0.0)
            if not fused:
                total.bytes += self.memory_bytes(i, operand_bytes)
        self.memo[key] = total
        return total

    def memory_bytes(self, i: _Instr, operand_bytes: float) -> float:
        """HBM bytes one top-level op reads and writes, as XLA's cost analysis counts them: a (fused) dynamic
        slice reads its slice, not the buffer; an in-place dynamic-update-slice writes its update (the scanned
        layers' stacked weights and gradients are sliced and updated so, once per layer); a fusion output that
        is one of its parameters passed through (loop state) costs nothing."""
        if i.opcode == "dynamic-slice":
            return 2 * array_bytes(i.shape)
        if i.opcode == "dynamic-update-slice":
            return 2 * array_bytes(self.shapes.get(i.operands[1], ""))
        if i.opcode != "fusion":
            return operand_bytes + array_bytes(i.shape)
        comp = self.comps.get(_attr(i.attrs, "calls"), [])
        defs = {x.name: x for x in comp}
        params = {int(x.args): x.name for x in comp if x.opcode == "parameter" and x.args.isdigit()}
        users: dict[str, list[_Instr]] = {}
        for x in comp:
            for o in x.operands:
                users.setdefault(o, []).append(x)
        root = next((x for x in comp if x.root), comp[-1] if comp else None)
        if root is None:
            return operand_bytes + array_bytes(i.shape)
        written, in_place = 0.0, set()
        for name in (root.operands if root.opcode == "tuple" else [root.name]):
            x = defs.get(name)
            if x is not None and x.opcode == "parameter":  # passed through: the output is the input's buffer
                in_place.add(x.name)
                continue
            target = defs.get(x.operands[0]) if x is not None and x.opcode == "dynamic-update-slice" else None
            if target is not None and target.opcode == "parameter":
                in_place.add(target.name)
                written += array_bytes(self.shapes.get(x.operands[1], ""))
            else:
                written += array_bytes(x.shape if x is not None else "")
        read = 0.0
        for j, operand in enumerate(i.operands):
            p = params.get(j)
            us = users.get(p, [])
            if p in in_place and all(u is root or u.opcode == "dynamic-update-slice" and u.operands[0] == p
                                     for u in us):
                continue
            if us and all(u.opcode in ("dynamic-slice", "slice") and u.operands[0] == p for u in us):
                read += sum(array_bytes(u.shape) for u in us)
            else:
                read += array_bytes(self.shapes.get(operand, ""))
        return read + written


def _window_pairs(out: int, size: int, stride: int, pad_low: int, lhs_dilate: int, rhs_dilate: int,
                  in_size: int) -> int:
    """(output position, window position) pairs of one spatial dimension that land on a real input element, not on
    padding or a hole of the input's dilation: what the TPU compiler's padded "convolutions" standing for dots and
    einsums really multiply."""
    o = np.arange(out)[:, None]
    idx = o * stride + np.arange(size)[None, :] * rhs_dilate - pad_low
    return int(np.count_nonzero((idx >= 0) & (idx <= (in_size - 1) * lhs_dilate) & (idx % lhs_dilate == 0)))


def _conv_flops(i: _Instr, lhs: list[int], rhs: list[int]) -> float:
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", i.attrs)
    if not (labels and lhs and rhs):
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    out = _dims(i.shape)
    window = dict(re.findall(r"(\w+)=([\d_x]+)", (re.search(r"window=\{([^}]*)\}", i.attrs) or [None, ""])[1]))
    n = sum(c.isdigit() for c in out_l)

    def per_dim(key, default):
        return [tuple(int(v) for v in x.split("_")) if "_" in x else int(x)
                for x in window[key].split("x")] if key in window else [default] * n

    size, stride, pad = per_dim("size", 1), per_dim("stride", 1), per_dim("pad", (0, 0))
    lhs_dilate, rhs_dilate = per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
    pairs = math.prod(_window_pairs(out[out_l.index(str(d))], size[d], stride[d], pad[d][0], lhs_dilate[d],
                                    rhs_dilate[d], lhs[lhs_l.index(str(d))]) for d in range(n))
    return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")] * pairs


def _constant(i: _Instr) -> int:
    try:
        return int(i.args)
    except ValueError:
        return 0


def hlo_cost(text: str) -> Cost:
    """Per-device cost of one run of the module whose optimized HLO text is `text` (`compiled.as_text()`)."""
    comps, entry = parse_hlo(text)
    return _Walker(comps).cost(entry)


def step_time(cost: Cost, peak_flops: float, hbm_bandwidth: float, ici_bandwidth: float) -> dict:
    """Roofline seconds: compute, HBM and ICI each at its peak, overlapped perfectly; the step is the
    slowest of the three (`bound` names it)."""
    parts = {"compute_s": cost.flops / peak_flops, "hbm_s": cost.bytes / hbm_bandwidth,
             "ici_s": cost.collective_bytes / ici_bandwidth}
    bound = max(parts, key=parts.get)
    return {**parts, "step_s": parts[bound], "bound": bound.removesuffix("_s")}
