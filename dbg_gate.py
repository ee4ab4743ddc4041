import sys, time
from crosspool_jax.execution import pool_runner as pr
orig_held = pr.GroupRunner.held_models
last = [None]
def held(self):
    h = orig_held(self)
    if h != last[0]:
        st = {}
        for key, gate in self._warm_gates.items():
            st[str(key)[:40]] = [("bg" if sp in self._background else "ready" if sp in self._ready else "prog" if sp in self._programs else "GONE") for sp in gate]
        print(f"[dbg {time.perf_counter():.1f}] held -> {set(h)} running={len(self.planner.running())} waiting={len(self.planner.waiting())} gates={st}", flush=True); last[0] = h
    return h
pr.GroupRunner.held_models = held
orig_wu = pr.GroupRunner.warm_up
def wu(self, model):
    r = orig_wu(self, model)
    print(f"[dbg {time.perf_counter():.1f}] warm_up {model} queued {r}; gates now {[ (str(k)[:40], len(g)) for k,g in self._warm_gates.items()]}", flush=True)
    return r
pr.GroupRunner.warm_up = wu
orig_c = pr.GroupRunner._compile
def comp(self, want):
    print(f"[dbg {time.perf_counter():.1f}] SERVING compile decode={want.decode} {[(l.groups,l.slots,l.tokens,l.max_pages) for l in want.lanes]} running={len(self.planner.running())}", flush=True)
    return orig_c(self, want)
pr.GroupRunner._compile = comp
from benchmarks import first_token
sys.argv = ["first_token"] + sys.argv[1:]
first_token.main()
