"""Static HBM-traffic report: the bytes XLA moves around the Pallas kernels of svconv's ops.

DESIGN asks that, in the program lowered for CUDA, the arrays XLA builds around the kernels
(pads, transposes, crops, layout changes, partial-sum reductions) cost at most 10% of the op's
minimal bytes. This module measures that without a GPU: it lowers an op (forward, ``jax.vjp``
backward, ``jax.jvp``) for CUDA under an abstract H100, parses the StableHLO text and prices the
ops around the kernels.

The model:

* **Real arrays** are the function's arguments and results and the operands and results of the
  kernel custom calls (Triton: ``__gpu$xla.gpu.triton``, Mosaic GPU: ``mosaic_gpu_v2``). Every
  other op is **glue**, including other custom calls and ops this module does not know.
  ``constant``, ``iota`` and the ops computed from them alone are folded by XLA: reading them
  is free and they do not join glue ops into one fusion; one that a kernel consumes or the
  function returns (a broadcast zero) costs its write, unless it is a view of a constant.
* Calls (``func.call``) are inlined, identical ops on identical operands are merged (XLA's CSE)
  and ops that no result depends on are dropped (XLA's DCE).
* **Fusions**: a maximal connected set of glue ops (linked by the values they pass each other,
  cut at real arrays) is one fusion. Its cost is the bytes it reads, each real array it starts
  from once, plus the bytes it writes: its arrays that a kernel consumes or the function
  returns. This is the fewest bytes XLA can move for that glue: XLA may split a set into several
  fusions (adding round trips through memory) or recompute a shared producer in two of them.
  A source is counted whole even when the glue reads part of it (a crop), an upper bound.
* **Layout-free ops** cost nothing when every op on the path from a real array is one: a
  ``reshape`` (all arrays are row-major, so it is a bitcast), a ``convert`` or
  ``bitcast_convert`` that keeps the width, a ``transpose`` or ``broadcast_in_dim`` that only
  moves or adds size-1 dimensions, a ``slice`` or ``pad`` that keeps the shape, a ``reduce`` over
  size-1 dimensions only (XLA's algebraic simplifier rewrites it into a reshape) and the
  ``Sharding`` annotation. An array such a path yields is a view of its source, not a copy.
* **Minimal bytes** of a lowered function: each argument's bytes once plus each result's bytes
  once. Forward: the op's inputs and its output. Backward (``jax.vjp`` with an upstream
  cotangent): the primals and the cotangent in, a gradient for every primal out (the forward
  kernel is dead code there). JVP: primals and a tangent for each of them in, output and output
  tangent out.

Run ``python -m experiments.static.traffic`` to write ``results/traffic.{md,json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jaxlib

import svconv
from experiments.static import lowering

ROOT = Path(__file__).resolve().parents[2]
TRITON_TARGET = "__gpu$xla.gpu.triton"
MOSAIC_TARGET = "mosaic_gpu_v2"
KERNEL_TARGETS = (TRITON_TARGET, MOSAIC_TARGET)
# What DESIGN allows: glue bytes over the op's minimal bytes.
BUDGET = 0.10

# ------------------------------------------------------------------------------------ lowering


def lower_for_cuda(fn: Callable, *args: jax.ShapeDtypeStruct) -> str:
    """StableHLO text of ``jax.jit(fn)`` lowered for CUDA under an abstract H100; every input stays
    an argument (``keep_unused``), so that the minimal bytes count it."""
    return lowering.lower_for_cuda(fn, *args, keep_unused=True)


# -------------------------------------------------------------------------------- the program

_BITS = {"bf16": 16, "i1": 8, "pred": 8, "index": 64}


def _element_bits(dtype: str) -> int:
    if dtype in _BITS:
        return _BITS[dtype]
    if m := re.fullmatch(r"complex<f(\d+)>", dtype):
        return 2 * int(m.group(1))
    if m := re.fullmatch(r"(?:f|i|ui|si)(\d+)\w*", dtype):  # f32, i8, f8E4M3FN, ...
        return int(m.group(1))
    raise ValueError(f"unknown element type {dtype!r}")


@dataclasses.dataclass(frozen=True)
class Array:
    """The type of one value: a dense row-major array."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return -(-self.size * _element_bits(self.dtype) // 8)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "bytes": self.nbytes}


_NOT_AN_ARRAY = Array((0,), "i8")  # tokens, tuples: nothing to move


def _parse_type(text: str) -> Array:
    text = text.strip()
    if not (text.startswith("tensor<") and text.endswith(">")):
        return _NOT_AN_ARRAY
    body = _split_top(text[len("tensor<") : -1])[0]  # drop an encoding after a comma
    dims = []
    while m := re.match(r"(\d+)x", body):
        dims.append(int(m.group(1)))
        body = body[m.end() :]
    if body.startswith("?"):
        raise ValueError(f"dynamic shapes are not supported: {text}")
    return Array(tuple(dims), body)


@dataclasses.dataclass
class Op:
    """One op of the inlined program."""

    name: str  # "stablehlo.pad", "stablehlo.custom_call", ...
    operands: tuple[int, ...]  # value ids
    results: tuple[int, ...]
    text: str  # the op's text, string literals elided (attributes for the layout rules)
    target: str | None = None  # custom-call target
    kernel: str | None = None  # Triton kernel name

    @property
    def short(self) -> str:
        if self.target:
            return f"custom_call @{self.target}"
        return self.name.removeprefix("stablehlo.")


@dataclasses.dataclass
class Program:
    """A lowered module with its calls inlined, CSE'd and dead ops removed."""

    arrays: list[Array]  # by value id
    args: list[int]
    results: list[int]
    ops: list[Op]  # in program order


# StableHLO text is parsed after its string literals are replaced by `"$<index>"` (they hold
# kernel IR, with any character) and `->` by a single character, so that brackets can be
# counted.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_PLACEHOLDER = re.compile(r'"\$(\d+)"')
_SSA = re.compile(r"%[\w.$-]+(?:#\d+)?")
_SYMBOL = r'@(?:"\$(\d+)"|([\w.$-]+))'  # @name or @"quoted name"
_ARROW = "\x01"
_CONTINUATION = re.compile(r"\s*(?:reducer\b|cond\b|do\b|\^|[({])")
_OPEN, _CLOSE = "([{<", ")]}>"


def _depths(text: str):
    """``(index, char, depth before char)`` for each character."""
    depth = 0
    for i, c in enumerate(text):
        if c in _CLOSE:
            depth -= 1
        yield i, c, depth
        if c in _OPEN:
            depth += 1


def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, start = [], 0
    for i, c, depth in _depths(text):
        if c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _matching(text: str, open_at: int) -> int:
    """Index of the bracket closing the one at ``open_at``."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] in _OPEN:
            depth += 1
        elif text[i] in _CLOSE:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced brackets in {text[:200]!r}")


def _type_list(text: str) -> list[Array]:
    """``T`` or ``(T {attrs}, T, ...)`` as arrays."""
    text = text.strip()
    if text.startswith("(") and _matching(text, 0) == len(text) - 1:
        text = text[1:-1]
    types = []
    for part in _split_top(text):
        brace = [i for i, c, d in _depths(part) if c == "{" and d == 0]
        types.append(_parse_type(part[: brace[0]] if brace else part))
    return types


def _signature_results(stmt: str, n_results: int) -> list[Array]:
    """Result types from the trailing ``: (ins) -> outs`` or ``: T`` of a statement."""
    colons = [i for i, c, d in _depths(stmt) if c == ":" and d == 0 and stmt[i - 1] == " "]
    if not colons:
        raise ValueError(f"no type signature in {stmt[:300]!r}")
    sig = stmt[colons[-1] + 1 :].split("\n")[0]
    arrows = [i for i, c, d in _depths(sig) if c == _ARROW and d == 0]
    types = _type_list(sig[arrows[-1] + 1 :] if arrows else sig)
    if len(types) == 1 and n_results > 1 and not arrows:
        types *= n_results
    if len(types) == 2 and n_results == 1 and not arrows:  # select's `: pred type, type`
        types = types[1:]
    if len(types) != n_results:
        raise ValueError(f"{n_results} results but types {types} in {stmt[:300]!r}")
    return types


@dataclasses.dataclass
class _Statement:
    results: list[str]
    name: str
    text: str  # strings elided
    key: str  # the text with SSA names erased and strings restored: equal for CSE-able ops
    callee: str | None = None
    target: str | None = None
    kernel: str | None = None


@dataclasses.dataclass
class _Function:
    args: list[str]
    arg_types: list[Array]
    result_types: list[Array]
    body: list[_Statement]


def _symbol(m: re.Match, strings: list[str]) -> str:
    return strings[int(m.group(1))][1:-1] if m.group(1) is not None else m.group(2)


def _parse_statement(stmt: str, strings: list[str]) -> _Statement:
    m = re.match(r'\s*(?:(%[^=]*?)\s*=\s*)?("\$\d+"|[\w.$]+)', stmt)
    if not m:
        raise ValueError(f"cannot parse {stmt[:300]!r}")
    res_text, name = m.group(1), m.group(2)
    if name.startswith('"'):  # generic form: "dialect.op"(...)
        name = strings[int(name[2:-1])].strip('"')
    results: list[str] = []
    if res_text:
        for part in _split_top(res_text):
            if mm := re.fullmatch(r"(%[\w.$-]+):(\d+)", part):
                results += [f"{mm.group(1)}#{i}" for i in range(int(mm.group(2)))]
            else:
                results.append(part)
    body = stmt[m.end() :]
    key = _PLACEHOLDER.sub(lambda s: strings[int(s.group(1))], _SSA.sub("%", f"{name} {body}"))
    st = _Statement(results, name, body, key)
    if name in ("call", "func.call"):
        st.callee = _symbol(re.match(rf"\s*{_SYMBOL}", body), strings)
    if name.endswith("custom_call"):
        if tm := re.match(rf"\s*{_SYMBOL}", body):
            st.target = _symbol(tm, strings)
        elif tm := re.search(r'call_target_name = "\$(\d+)"', body):
            st.target = strings[int(tm.group(1))].strip('"')
        if km := re.search(r'\bname = "\$(\d+)"', body):
            st.kernel = strings[int(km.group(1))].strip('"')
        elif st.target == MOSAIC_TARGET:  # its name is inside the serialized module
            st.kernel = "mosaic kernel"
    return st


def _parse_header(line: str, strings: list[str]) -> tuple[str, list[str], list[Array], list[Array]]:
    m = re.match(rf"\s*func\.func\s+(?:(?:public|private|nested)\s+)?{_SYMBOL}\(", line)
    close = _matching(line, m.end() - 1)
    args, arg_types = [], []
    for part in _split_top(line[m.end() : close]):
        name, typ = part.split(":", 1)
        args.append(name.strip())
        arg_types += _type_list(typ)
    rest = line[close + 1 :].strip()
    rest = rest.removesuffix("{").strip()
    rest = re.sub(r"\battributes\s*\{.*\}\s*$", "", rest).strip()
    result_types = _type_list(rest[1:]) if rest.startswith(_ARROW) else []
    return _symbol(m, strings), args, arg_types, result_types


def _parse_module(text: str) -> tuple[dict[str, _Function], str]:
    """The functions of a module and the name of its public entry point."""
    strings: list[str] = []

    def elide(m):
        strings.append(m.group(0))
        return f'"${len(strings) - 1}"'

    text = _STRING.sub(elide, text).replace("->", _ARROW)
    funcs: dict[str, _Function] = {}
    entry = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.lstrip().startswith("func.func"):
            continue
        name, args, arg_types, result_types = _parse_header(line, strings)
        if re.match(r"\s*func\.func\s+public\b", line) or name == "main":
            entry = entry or name
        # One statement per op: its line, and the lines of its regions (a reduce's `reducer`,
        # a while's `cond`/`do`), which may start on the next line.
        texts, depth = [], 1
        while True:
            line = lines[i]
            i += 1
            delta = line.count("{") - line.count("}")
            if depth == 1 and line.strip() == "}":
                break
            if depth == 1 and not _CONTINUATION.match(line):
                texts.append(line)
            else:
                texts[-1] += "\n" + line
            depth += delta
        body = [_parse_statement(t, strings) for t in texts]
        funcs[name] = _Function(args, arg_types, result_types, body)
    if entry is None:
        raise ValueError("no public function in the module")
    return funcs, entry


class _Inliner:
    def __init__(self, funcs: dict[str, _Function], cse: bool):
        self.funcs = funcs
        self.merge = cse
        self.arrays: list[Array] = []
        self.ops: list[Op] = []
        self.cse: dict[tuple, tuple[int, ...]] = {}

    def value(self, typ: Array) -> int:
        self.arrays.append(typ)
        return len(self.arrays) - 1

    def call(self, name: str, arg_ids: Sequence[int]) -> list[int]:
        func = self.funcs[name]
        env = dict(zip(func.args, arg_ids, strict=True))
        for st in func.body:
            # Names that the op's own regions define (block arguments, inner results).
            inner = set(re.findall(r"(%[\w.$-]+)\s*[:=]", st.text.partition("\n")[2]))
            operands = tuple(env[t] for t in _SSA.findall(st.text) if t in env and t not in inner)
            if st.name in ("return", "func.return"):
                return list(operands)
            if "\n" in st.text and any(t in st.text for t in KERNEL_TARGETS):
                raise ValueError(f"a kernel inside control flow ({st.name}) is not supported")
            if st.name.endswith("while"):  # priced once, it would hide all but one iteration
                raise ValueError("a loop around the kernels is not priced (stablehlo.while)")
            if st.callee is not None:
                ids = self.call(st.callee, operands)
            else:
                key = (st.key, operands)
                merge = self.merge and "has_side_effect = true" not in st.text
                ids = self.cse.get(key) if merge else None
                if ids is None:
                    types = _signature_results(st.text, len(st.results))
                    ids = tuple(self.value(t) for t in types)
                    self.ops.append(Op(st.name, operands, ids, st.text, st.target, st.kernel))
                    self.cse[key] = ids
            env.update(zip(st.results, ids, strict=True))
        raise ValueError(f"function {name} has no return")


def parse_program(text: str, *, cse: bool = True) -> Program:
    """The lowered module's entry function with its calls inlined, identical ops merged (unless
    ``cse=False``) and dead code removed."""
    funcs, entry = _parse_module(text)
    inliner = _Inliner(funcs, cse)
    args = [inliner.value(t) for t in funcs[entry].arg_types]
    results = inliner.call(entry, args)
    live, ops = set(results), []
    for op in reversed(inliner.ops):
        if live.intersection(op.results) or "has_side_effect = true" in op.text:
            ops.append(op)
            live.update(op.operands)
    return Program(inliner.arrays, args, list(results), ops[::-1])


# ------------------------------------------------------------------------------- the pricing


def _ints(text: str, attr: str) -> list[int] | None:
    m = re.search(rf"\b{attr} = (?:array<i64:\s*)?\[?([-\d,\s]*)", text)
    return [int(v) for v in m.group(1).replace(",", " ").split()] if m else None


def _keeps_order(shape: Sequence[int], order: Sequence[int]) -> bool:
    """Whether ``order`` (positions of dims, read in sequence) visits non-unit dims in order."""
    kept = [p for p in order if shape[p] != 1]
    return kept == sorted(kept)


def is_layout_free(op: Op, arrays: list[Array]) -> bool:
    """Whether ``op`` is a view of its first operand (no bytes moved); see the module doc."""
    name = op.name.removeprefix("stablehlo.")
    if op.target == "Sharding":
        return True
    if not op.operands or len(op.results) != 1:
        return False
    src, out = arrays[op.operands[0]], arrays[op.results[0]]
    match name:
        case "reshape":
            return True
        case "convert":
            return src.dtype == out.dtype
        case "bitcast_convert":
            return src.shape == out.shape and _element_bits(src.dtype) == _element_bits(out.dtype)
        case "transpose":
            perm = _ints(op.text, "dims")
            return perm is not None and _keeps_order(src.shape, perm)
        case "broadcast_in_dim":
            dims = _ints(op.text, "dims")
            return src.size == out.size and dims is not None and _keeps_order(out.shape, dims)
        case "slice":
            return src.shape == out.shape
        case "pad":
            return all(not any(_ints(op.text, a) or [1]) for a in ("low", "high", "interior"))
        case "reduce":
            return src.size == out.size
    return False


@dataclasses.dataclass
class Region:
    """One fusion of glue ops and what it moves."""

    ops: list[str]  # the kinds of ops that move bytes, in program order
    reads: list[tuple[str, Array]]  # (what, type)
    writes: list[tuple[str, Array, str]]  # (for what, type, ops on its path)

    @property
    def read_bytes(self) -> int:
        return sum(a.nbytes for _, a in self.reads)

    @property
    def write_bytes(self) -> int:
        return sum(a.nbytes for _, a, _ in self.writes)

    @property
    def nbytes(self) -> int:
        return self.read_bytes + self.write_bytes

    def to_json(self) -> dict:
        return {
            "bytes": self.nbytes,
            "ops": self.ops,
            "reads": [{"array": w, **a.to_json()} for w, a in self.reads],
            "writes": [{"for": w, "ops": p, **a.to_json()} for w, a, p in self.writes],
        }


@dataclasses.dataclass
class Traffic:
    """The static traffic of one lowered function."""

    minimal_bytes: int  # arguments read once, results written once
    kernels: list[str]  # Triton kernel names, in program order
    kernel_io_bytes: int  # kernel operands + results (what the kernels move, at least)
    regions: list[Region]  # glue fusions that move bytes, most bytes first

    @property
    def glue_bytes(self) -> int:
        return sum(r.nbytes for r in self.regions)

    @property
    def ratio(self) -> float:
        return self.glue_bytes / self.minimal_bytes

    def largest_arrays(self, n: int = 5) -> list[dict]:
        """The ``n`` largest arrays the glue writes or reads, with the ops that make them."""
        moves = [
            {"move": "write", "ops": p, "for": w, **a.to_json()}
            for r in self.regions
            for w, a, p in r.writes
        ]
        moves += [
            {"move": "read", "ops": "+".join(r.ops), "array": w, **a.to_json()}
            for r in self.regions
            for w, a in r.reads
        ]
        return sorted(moves, key=lambda m: -m["bytes"])[:n]


def _with_tokens(values, arrays, labels):
    """``labels`` with the effect tokens the program leads its arguments or results with (an
    ordered effect's: empty arrays; the Mosaic kernels' GPU interpret mode declares one)."""
    extra = len(values) - len(labels)
    if extra > 0 and all(arrays[v].size == 0 for v in values[:extra]):
        return [*(["effect token"] * extra), *labels]
    return labels


def _is_kernel(op: Op) -> bool:
    return op.target in KERNEL_TARGETS


def _constant_ops(prog: Program) -> set[int]:
    """``id``s of the ops XLA evaluates when compiling: constants, iotas and the ops computed
    from them alone. They read nothing at run time and do not join glue ops into one fusion."""
    produced_by = {v: op for op in prog.ops for v in op.results}
    folded: set[int] = set()
    for op in prog.ops:
        if op.target is None and all(id(produced_by.get(v)) in folded for v in op.operands):
            if op.operands or op.name in ("stablehlo.constant", "stablehlo.iota"):
                folded.add(id(op))
    return folded


def analyze(
    hlo_text: str,
    arg_labels: Sequence[str] | None = None,
    result_labels: Sequence[str] | None = None,
    *,
    cse: bool = True,
) -> Traffic:
    """Price the glue of a module lowered for CUDA (see the module doc for the model).

    ``cse=False`` prices every copy XLA's common-subexpression elimination would merge (two
    kernels padding the same input the same way) as if it were made twice.
    """
    prog = parse_program(hlo_text, cse=cse)
    arrays = prog.arrays
    order = {id(op): i for i, op in enumerate(prog.ops)}
    producer = {v: op for op in prog.ops for v in op.results}
    kernels = [op for op in prog.ops if _is_kernel(op)]
    folded = _constant_ops(prog)

    # What each real array is called in the report, and who needs each value materialised.
    # Kernels are named by their Pallas names, numbered where one name is called more than once.
    names = [op.kernel or "?" for op in kernels]
    kernel_name = {
        id(op): f"{name}#{names[:i].count(name)}" if names.count(name) > 1 else name
        for i, (op, name) in enumerate(zip(kernels, names, strict=True))
    }
    arg_labels = _with_tokens(
        prog.args, arrays, arg_labels or [f"arg{i}" for i in range(len(prog.args))]
    )
    if result_labels is not None:
        result_labels = _with_tokens(prog.results, arrays, result_labels)
    label = dict(zip(prog.args, arg_labels, strict=True))
    for op in kernels:
        for i, v in enumerate(op.results):
            label[v] = f"{kernel_name[id(op)]} output" + (f" {i}" if len(op.results) > 1 else "")
    needed_by: dict[int, list[str]] = {}
    for op in kernels:
        for i, v in enumerate(op.operands):
            needed_by.setdefault(v, []).append(f"{kernel_name[id(op)]} operand {i}")
    result_labels = result_labels or [f"result{i}" for i in range(len(prog.results))]
    for v, name in zip(prog.results, result_labels, strict=True):
        needed_by.setdefault(v, []).append(name)

    @functools.cache
    def view(v: int) -> bool:
        """Whether ``v`` is a real array or a constant seen through layout-free ops only."""
        p = producer.get(v)
        if p is None or _is_kernel(p) or p.name == "stablehlo.constant":
            return True
        return is_layout_free(p, arrays) and view(p.operands[0])

    # Fusions: connected glue ops. A value computed from constants alone that a kernel needs
    # (a broadcast zero, an iota) is written by a fusion of its own.
    glue = [op for op in prog.ops if not _is_kernel(op) and id(op) not in folded]
    glue += [
        op
        for op in prog.ops
        if id(op) in folded and any(v in needed_by and not view(v) for v in op.results)
    ]
    parent = {id(op): id(op) for op in glue}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for op in glue:
        if id(op) in folded:
            continue
        for v in op.operands:
            p = producer.get(v)
            if p is not None and id(p) in parent and id(p) not in folded:
                parent[find(id(op))] = find(id(p))
    groups: dict[int, list[Op]] = {}
    for op in glue:
        groups.setdefault(find(id(op)), []).append(op)

    regions = []
    for members in groups.values():
        inside = {id(op) for op in members}
        reads: dict[int, str] = {}
        writes, moving = [], set()
        for v in (v for op in members for v in op.results):
            if v not in needed_by or view(v):
                continue
            path, stack, seen = set(), [v], set()
            while stack:  # back to the real arrays this output is computed from
                u = stack.pop()
                p = producer.get(u)
                if p is None or id(p) not in inside:
                    if p is None or id(p) not in folded:
                        reads[u] = label.get(u, "?")
                    continue
                if id(p) not in seen:
                    seen.add(id(p))
                    if not is_layout_free(p, arrays):
                        path.add(id(p))
                    stack.extend(p.operands)
            moving |= path
            steps = [op.short for op in prog.ops if id(op) in path]
            writes.append((", ".join(needed_by[v]), arrays[v], "+".join(dict.fromkeys(steps))))
        if writes:
            steps = [op.short for op in sorted(members, key=lambda o: order[id(o)])]
            ops = [s for s, op in zip(steps, members, strict=True) if id(op) in moving]
            regions.append(
                Region(list(dict.fromkeys(ops)), [(w, arrays[u]) for u, w in reads.items()], writes)
            )
    regions.sort(key=lambda r: -r.nbytes)
    return Traffic(
        minimal_bytes=sum(arrays[v].nbytes for v in [*prog.args, *prog.results]),
        kernels=names,
        kernel_io_bytes=sum(arrays[v].nbytes for op in kernels for v in op.operands + op.results),
        regions=regions,
    )


# ---------------------------------------------------------------------------- svconv's ops


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape: ``fn(*inputs) -> output``, inputs named and shaped."""

    op: str
    variant: str
    fn: Callable
    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    output: tuple[int, ...]

    @property
    def id(self) -> str:
        return f"{self.op} {self.variant}"

    def shapes(self) -> str:
        return ", ".join(f"{n} {list(s)}" for n, s in self.inputs)


def design_cases() -> list[Case]:
    """DESIGN's GPU shapes (stride 1, "SAME" padding). ``local_conv2d`` is taken at the GPU
    benchmark's shape, N=8, 128x128, 32->32, 3x3; ``pixel_splat2d`` like ``pixel_filter2d``;
    the Gaussian ops at 31x31 on the per-pixel filters' images (isotropic, and rotated with
    ``rho`` for the filter); ``deformable_conv2d`` at the modulated conv's shape."""

    def pallas(fn):
        return functools.partial(fn, impl="pallas")

    n, h, c = 8, 128, 64
    cases = [
        Case(
            "modulated_conv2d",
            "3x3",
            pallas(svconv.modulated_conv2d),
            (("x", (n, h, h, c)), ("w", (3, 3, c, c)), ("d", (n, h, h, 3, 3))),
            (n, h, h, c),
        ),
        Case(
            "local_conv2d",
            "3x3",
            pallas(svconv.local_conv2d),
            (("x", (n, h, h, 32)), ("w", (h, h, 3, 3, 32, 32))),
            (n, h, h, 32),
        ),
    ]
    n, h, c = 8, 256, 64
    for op in (svconv.pixel_filter2d, svconv.pixel_splat2d):
        for k in (7, 15):
            inputs = (("x", (n, h, h, c)), ("k", (n, h, h, k, k)))
            cases.append(Case(op.__name__, f"{k}x{k}", pallas(op), inputs, (n, h, h, c)))
    image, grid = ("x", (n, h, h, c)), (n, h, h)
    for op in (svconv.gaussian_filter2d, svconv.gaussian_splat2d):
        fn = functools.partial(pallas(op), size=31)
        cases.append(Case(op.__name__, "31x31", fn, (image, ("sigma", grid)), (n, h, h, c)))

    def rotated(x, sigma_rows, sigma_cols, rho):
        return svconv.gaussian_filter2d(x, (sigma_rows, sigma_cols), 31, rho=rho, impl="pallas")

    inputs = (image, ("sigma_rows", grid), ("sigma_cols", grid), ("rho", grid))
    cases.append(Case("gaussian_filter2d", "31x31 rotated", rotated, inputs, (n, h, h, c)))
    # The deformable conv's Triton kernels (impl="triton": not yet the default), offsets and
    # mask in the images' dtype, two offset groups.
    n, h, c = 8, 128, 64
    deformable = functools.partial(svconv.deformable_conv2d, impl="triton")
    grid7 = (n, h, h, 3, 3, 2)
    inputs = (("x", (n, h, h, c)), ("w", (3, 3, c, c)), ("offsets", (*grid7, 2)), ("mask", grid7))
    cases.append(Case("deformable_conv2d", "3x3", deformable, inputs, (n, h, h, c)))
    return cases


def mosaic_cases(gaussian_size: int = 31) -> list[Case]:
    """The Mosaic GPU kernels' programs (``impl="mosaic"``) at DESIGN's shapes: the per-pixel
    filter at 7x7 and the isotropic Gaussian filter at 31x31 (``gaussian_size``), N=8, 256x256,
    64 channels; the
    modulated conv, N=8, 128x128, 64->64, 3x3 (TF32 for float32, whose gradient in the weights
    runs the Triton kernel; bfloat16's is a Mosaic kernel); the locally connected conv, N=8,
    128x128, 32->32, 3x3 (its gradient in the image: the Triton kernel)."""
    n, h, c = 8, 256, 64
    image, grid = ("x", (n, h, h, c)), (n, h, h)
    pixel = functools.partial(svconv.pixel_filter2d, impl="mosaic")
    g = gaussian_size
    gauss = functools.partial(svconv.gaussian_filter2d, size=g, impl="mosaic")
    modulated = functools.partial(
        svconv.modulated_conv2d, precision=jax.lax.Precision.DEFAULT, impl="mosaic"
    )
    m = 128
    mod_inputs = (("x", (n, m, m, c)), ("w", (3, 3, c, c)), ("d", (n, m, m, 3, 3)))
    local = functools.partial(svconv.local_conv2d, impl="mosaic")
    loc_inputs = (("x", (n, m, m, 32)), ("w", (m, m, 3, 3, 32, 32)))
    return [
        Case("pixel_filter2d", "7x7 mosaic", pixel, (image, ("k", (n, h, h, 7, 7))), (n, h, h, c)),
        Case("gaussian_filter2d", f"{g}x{g} mosaic", gauss, (image, ("sigma", grid)), (n, h, h, c)),
        Case("modulated_conv2d", "3x3 mosaic", modulated, mod_inputs, (n, m, m, c)),
        Case("local_conv2d", "3x3 mosaic", local, loc_inputs, (n, m, m, 32)),
    ]


DIRECTIONS = ("fwd", "bwd", "jvp")
DTYPES = ("float32", "bfloat16")


def traced_function(case: Case, direction: str, dtype: str):
    """``(fn, abstract args, arg labels, result labels)`` of one direction of ``case``:

    * ``fwd``: ``fn(*inputs) -> y``;
    * ``bwd``: ``jax.vjp`` of ``fn`` applied to an upstream cotangent ``g``: ``(*inputs, g) ->``
      one gradient per input;
    * ``jvp``: ``jax.jvp`` with a tangent for every input: ``(*inputs, *tangents) -> (y, ty)``.
    """
    names = [name for name, _ in case.inputs]
    inputs = [jax.ShapeDtypeStruct(s, dtype) for _, s in case.inputs]
    out = jax.ShapeDtypeStruct(case.output, dtype)
    if direction == "fwd":
        return case.fn, inputs, names, ["y"]
    if direction == "bwd":

        def backward(*args):
            _, vjp = jax.vjp(case.fn, *args[:-1])
            return vjp(args[-1])

        return backward, [*inputs, out], [*names, "g"], [f"d{n}" for n in names]
    if direction == "jvp":

        def forward_mode(*args):
            return jax.jvp(case.fn, args[: len(names)], args[len(names) :])

        return forward_mode, inputs * 2, [*names, *(f"t{n}" for n in names)], ["y", "ty"]
    raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")


@dataclasses.dataclass
class Row:
    """The report's line for one op, direction and dtype."""

    op: str
    variant: str
    direction: str
    dtype: str
    shapes: str
    traffic: Traffic | None  # None: the direction is not available
    reason: str = ""  # why it is not available

    @property
    def ok(self) -> bool:
        return self.traffic is not None and self.traffic.ratio <= BUDGET

    def to_json(self) -> dict:
        row = {
            "op": self.op,
            "variant": self.variant,
            "direction": self.direction,
            "dtype": self.dtype,
            "shapes": self.shapes,
            "available": self.traffic is not None,
        }
        if self.traffic is None:
            return {**row, "reason": self.reason}
        t = self.traffic
        return {
            **row,
            "minimal_bytes": t.minimal_bytes,
            "kernels": len(t.kernels),
            "kernel_names": t.kernels,
            "kernel_io_bytes": t.kernel_io_bytes,
            "glue_bytes": t.glue_bytes,
            "ratio": t.ratio,
            "within_budget": t.ratio <= BUDGET,
            "largest_glue_arrays": t.largest_arrays(),
            "glue_fusions": [r.to_json() for r in t.regions],
        }


def measure(case: Case, direction: str, dtype: str) -> Row:
    """Lower one direction of ``case`` for CUDA and price its glue. A direction JAX cannot
    trace (forward mode through a ``custom_vjp``) is reported as not available."""
    fn, args, arg_labels, result_labels = traced_function(case, direction, dtype)
    row = Row(case.op, case.variant, direction, dtype, case.shapes(), None)
    try:
        text = lower_for_cuda(fn, *args)
    except Exception as e:  # noqa: BLE001 - any failure to trace is what the row reports
        row.reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    else:
        row.traffic = analyze(text, arg_labels, result_labels)
    return row


# ---------------------------------------------------------------------------------- report


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def to_markdown(rows: list[Row], meta: dict) -> str:
    lines = [
        "# svconv — HBM traffic around the Pallas kernels (static, lowered for CUDA)",
        "",
        f"* date: {meta['date']}; jax {meta['jax']}, jaxlib {meta['jaxlib']}; "
        "lowered for `cuda` under an abstract H100, nothing run",
        "* minimal bytes: the lowered function's arguments read once and results written "
        "once (fwd: inputs -> y; bwd: inputs and the cotangent g -> every gradient; jvp: "
        "inputs and their tangents -> y and its tangent)",
        "* glue: bytes moved by the XLA ops around the kernels, each connected set of them "
        "one fusion (its real inputs read once, the arrays it hands to kernels or returns "
        "written once); layout-free reshapes, unit-dim transposes and the like are free; "
        f"budget {BUDGET:.0%} of the minimal bytes. Model: `experiments/static/traffic.py`.",
        "* kernel I/O: the kernels' operands and results, each counted once per kernel",
        "* MB = 10^6 bytes",
        "",
        "| op | shape | direction | dtype | kernels | minimal MB | kernel I/O MB | glue MB "
        "| glue / minimal | within 10% |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        head = f"| {r.op} | {r.variant} | {r.direction} | {r.dtype} |"
        if r.traffic is None:
            lines.append(f"{head} – | – | – | – | not available | – |")
            continue
        t = r.traffic
        lines.append(
            f"{head} {len(t.kernels)} | {_mb(t.minimal_bytes)} | {_mb(t.kernel_io_bytes)} | "
            f"{_mb(t.glue_bytes)} | {t.ratio:+.2f}x | {'yes' if r.ok else '**no**'} |"
        )
    lines += ["", "## Not available", ""]
    reasons = {}
    for r in rows:
        if r.traffic is None:
            reasons.setdefault(r.reason, []).append(f"{r.op} {r.variant} {r.direction} {r.dtype}")
    for reason, which in reasons.items():
        lines.append(f"* {', '.join(which)}: `{reason}`")
    if not reasons:
        lines.append("* none")
    lines += ["", "## Where the glue bytes go", ""]
    lines.append(
        "Each fusion: the ops in it that move bytes, what it reads and what it writes "
        "(for which kernel operand or result). Rows without glue are left out."
    )
    for r in rows:
        if r.traffic is None or not r.traffic.regions:
            continue
        t = r.traffic
        lines += [
            "",
            f"### {r.op} {r.variant} {r.direction} {r.dtype}: {_mb(t.glue_bytes)} MB "
            f"({t.ratio:+.2f}x of {_mb(t.minimal_bytes)} MB)",
            "",
            f"Inputs {r.shapes}; kernels: {', '.join(t.kernels)}.",
            "",
            "| MB | ops | reads | writes |",
            "| --- | --- | --- | --- |",
        ]
        for g in t.regions:
            reads = "; ".join(f"{w} {a} ({_mb(a.nbytes)})" for w, a in g.reads) or "–"
            writes = "; ".join(f"{a} ({_mb(a.nbytes)}) by {p} for {w}" for w, a, p in g.writes)
            lines.append(f"| {_mb(g.nbytes)} | {', '.join(g.ops)} | {reads} | {writes} |")
    return "\n".join(lines) + "\n"


def run(cases: list[Case], directions=DIRECTIONS, dtypes=DTYPES) -> list[Row]:
    return [measure(c, d, t) for c in cases for d in directions for t in dtypes]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "results" / "traffic",
        help="path without suffix of the .md and .json to write",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cases = design_cases() + mosaic_cases()
    rows = run(cases)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "platform": "cuda (abstract NVIDIA H100 80GB HBM3), lowered only",
        "budget": BUDGET,
        "cases": {c.id: {n: list(s) for n, s in c.inputs} for c in cases},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {**meta, "rows": [r.to_json() for r in rows]}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(rows, meta))
    for r in rows:
        t = r.traffic
        status = "not available" if t is None else f"{t.ratio:+.2f}x"
        print(f"{r.op:17} {r.variant:6} {r.direction} {r.dtype:9} {status}")
    print(f"wrote {args.out}.md/.json in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
