"""Counts the kernels of XLA's optimized HLO dumps, by kind and by the part of the step they came from.

Issue 15's compile time goes into compiling a step program's separate kernels one by one (ptxas,
LLVM: docs/benchmarks.md, "One H100, 2026-12-07 (day)"), so the kernel count is one thing to cut
(how costly each is to compile is the other: a simpler sort comparator alone compiled 1.34x
faster with as many kernels, "One H100, 2026-12-07 (night)"). Dump a program's optimized HLO,
then count it (any machine; the GPU's dump is what matters):

    XLA_FLAGS=--xla_dump_to=/tmp/dump python -m benchmarks.precompile_bench --models 2 \\
        --max-context 131072 --max-slots 64 --threads 1 --programs 3
    python -m benchmarks.hlo_kernels /tmp/dump [--modules jit_body] [--min-kernels 20] [--top 40]

A kernel here is an instruction of the entry computation or of a while body / condition /
conditional branch it runs (recursively) other than parameters, constants, tuples, bitcasts and
control flow: a fusion, a custom call (Triton, Mosaic GPU, cuBLAS, CUB), a copy, a sort, ...
Its part of the step is the first of the step program's named scopes (`pooled_step.build_step`:
embed, attention_pre, kv_write, attention_post, to_ffn, ffn, from_ffn, sample, next_carry) found
in its op names (for a fusion: the most common among the instructions it fuses), "other" when
none is. Only modules whose file name matches --modules (a regex; default `jit_body`, the step
programs) with at least --min-kernels kernels are counted.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
from collections.abc import Iterable

STEP_SCOPES = ("embed", "attention_pre", "kv_write", "attention_post", "to_ffn", "ffn", "from_ffn",
               "sample", "next_carry")
NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
               "call", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency"}
_COMP = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INST = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = .*? ([a-z][a-z\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')

Computations = dict[str, list[tuple[str, str]]]  # name -> [(opcode, instruction line)]


def parse_module(text: str) -> tuple[Computations, str | None]:
    """(computations, entry computation's name) of one HLO module's text."""
    comps: Computations = {}
    cur, entry = None, None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and not line.startswith(" "):
            cur = m.group(2)
            comps[cur] = []
            if m.group(1):
                entry = cur
            continue
        m = _INST.match(line)
        if cur is not None and m:
            comps[cur].append((m.group(1), line))
    return comps, entry


def _called(line: str) -> list[str]:
    """The computations a while / conditional / call instruction runs."""
    names = [m.group(1) for key in ("body", "condition", "to_apply", "true_computation", "false_computation")
             if (m := re.search(key + r"=%?([\w.\-]+)", line))]
    m = re.search(r"branch_computations=\{([^}]*)\}", line)
    if m:
        names += [s.strip().lstrip("%") for s in m.group(1).split(",")]
    return names


def executed(comps: Computations, entry: str) -> list[str]:
    """The entry computation and every control-flow computation it runs, recursively."""
    todo, seen = [entry], []
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.append(c)
        todo += [n for op, line in comps[c] if op in ("while", "conditional", "call") for n in _called(line)]
    return seen


def scope_of(op_names: Iterable[str]) -> str:
    """The most common step scope among op names ("other" when none has one)."""
    found = collections.Counter(next((p for p in name.split("/") if p in STEP_SCOPES), "other")
                                for name in op_names)
    named = [(n, s) for s, n in found.items() if s != "other"]
    return max(named)[1] if named else "other"


def kind_of(op: str, line: str) -> str:
    """"fusion.kLoop", "cc:<target>", or the opcode."""
    if op == "fusion":
        m = re.search(r"kind=(k\w+)", line)
        return "fusion." + (m.group(1) if m else "?")
    if op == "custom-call":
        m = re.search(r'custom_call_target="([^"]*)"', line)
        return "cc:" + (m.group(1) if m else "?")
    return op


def count_module(text: str) -> collections.Counter[tuple[str, str]]:
    """(scope, kind) -> kernels of one module."""
    comps, entry = parse_module(text)
    out: collections.Counter[tuple[str, str]] = collections.Counter()
    if entry is None:
        return out
    for c in executed(comps, entry):
        for op, line in comps[c]:
            if op in NOT_KERNELS:
                continue
            names = _OP_NAME.findall(line)
            m = re.search(r"calls=%?([\w.\-]+)", line) if op == "fusion" else None
            if m and m.group(1) in comps:
                names += [n for _, inner in comps[m.group(1)] for n in _OP_NAME.findall(inner)]
            out[(scope_of(names), kind_of(op, line))] += 1
    return out


def by_scope(counts: collections.Counter[tuple[str, str]]) -> collections.Counter[str]:
    """(scope, kind) counts summed per scope."""
    out: collections.Counter[str] = collections.Counter()
    for (scope, _), v in counts.items():
        out[scope] += v
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dump", help="XLA's --xla_dump_to directory")
    ap.add_argument("--modules", default="jit_body", help="regex on the dump's file names")
    ap.add_argument("--min-kernels", type=int, default=20)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args(argv)
    files = sorted(p for p in glob.glob(os.path.join(args.dump, "*after_optimizations.txt"))
                   if re.search(args.modules, os.path.basename(p)))
    if not files:
        raise SystemExit(f"no *after_optimizations.txt matching {args.modules!r} in {args.dump} "
                         "(was XLA_FLAGS=--xla_dump_to set?)")
    total: collections.Counter[tuple[str, str]] = collections.Counter()
    modules = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            counts = count_module(f.read())
        n = sum(counts.values())
        if n < args.min_kernels:
            continue
        modules += 1
        total += counts
        print(f"{os.path.basename(path)}: {n} kernels; "
              + ", ".join(f"{s} {v}" for s, v in by_scope(counts).most_common()))
    n = sum(total.values())
    print(f"\n{modules} modules of >= {args.min_kernels} kernels: {n} kernels, "
          f"{n / max(modules, 1):.1f} a module")
    print("\nkernels a module by step scope:")
    for scope, v in by_scope(total).most_common():
        print(f"  {scope:16s} {v / max(modules, 1):6.1f}")
    print("\nkernels a module by scope and kind:")
    for (scope, kind), v in total.most_common(args.top):
        print(f"  {scope:16s} {kind:36s} {v / max(modules, 1):6.1f}")


if __name__ == "__main__":
    main()
