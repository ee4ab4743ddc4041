"""Counts the kernels of XLA's optimized HLO dumps by origin (source file:line and op_name).

usage: python hlo_count.py DUMP_DIR [top]
"""
import collections, glob, os, re, sys

SKIP = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
        "call", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency"}
inst_re = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][a-z\-]*)\((.*)$")
comp_re = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")


def parse(path):
    comps, cur, entry = {}, None, None
    for line in open(path):
        m = comp_re.match(line)
        if m and not line.startswith(" "):
            cur = m.group(2); comps[cur] = []
            if m.group(1): entry = cur
            continue
        if cur is None: continue
        m = inst_re.match(line)
        if m: comps[cur].append((m.group(1), m.group(2), line))
    return comps, entry


def executed(comps, entry):
    todo, seen = [entry], set()
    while todo:
        c = todo.pop()
        if c in seen or c not in comps: continue
        seen.add(c)
        for _, op, line in comps[c]:
            if op in ("while", "conditional", "call"):
                for key in ("body", "condition", "to_apply"):
                    m = re.search(key + r"=%?([\w.\-]+)", line)
                    if m: todo.append(m.group(1))
                m = re.search(r"branch_computations=\{([^}]*)\}", line)
                if m: todo += [s.strip().lstrip("%") for s in m.group(1).split(",")]
                m = re.search(r"true_computation=%?([\w.\-]+), false_computation=%?([\w.\-]+)", line)
                if m: todo += [m.group(1), m.group(2)]
    return seen


def origin(line):
    f = re.search(r'source_file="([^"]*)"', line); l = re.search(r"source_line=(\d+)", line)
    src = f"{os.path.basename(f.group(1))}:{l.group(1)}" if f and l else "?"
    n = re.search(r'op_name="([^"]*)"', line)
    name = n.group(1) if n else "?"
    name = re.sub(r"^jit\([^)]*\)/", "", name)
    return src, name


def main():
    d = sys.argv[1]; top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    files = sorted(glob.glob(os.path.join(d, "*after_optimizations.txt")))
    by_src, by_op, total, used = collections.Counter(), collections.Counter(), 0, 0
    for p in files:
        comps, entry = parse(p)
        ex = executed(comps, entry)
        counts = collections.Counter()
        mod_src, mod_op = collections.Counter(), collections.Counter()
        for c in ex:
            for _, op, line in comps[c]:
                if op in SKIP: continue
                kind = op
                if op == "fusion":
                    k = re.search(r"kind=(k\w+)", line); kind = "fusion." + (k.group(1) if k else "?")
                if op == "custom-call":
                    t = re.search(r'custom_call_target="([^"]*)"', line); kind = "cc:" + (t.group(1) if t else "?")
                counts[kind] += 1
                src, name = origin(line)
                parts = [q for q in name.split("/") if q not in ("while", "body", "cond", "eval_jaxpr", "branch_0_fun", "branch_1_fun")]
                mod_src[(src, kind)] += 1
                mod_op["/".join(parts[:5]) + "  [" + kind + "]"] += 1
        n = sum(counts.values())
        if n < 20:
            continue
        total += n; used += 1
        by_src.update(mod_src); by_op.update(mod_op)
        print(f"{os.path.basename(p)[:90]}: {n} kernels, {len(ex)} executed computations: "
              + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    print(f"\n{used} modules of >= 20 kernels, {total} kernels, {total / max(1, used):.1f} a module")
    print("\nby source line (all modules):")
    for (src, kind), v in by_src.most_common(top):
        print(f"  {v:5d}  {src:40s} {kind}")
    print("\nby op_name prefix:")
    for k, v in by_op.most_common(top):
        print(f"  {v:5d}  {k[:150]}")


main()
