"""Step programs compile off the serving path (`GroupRunner`, docs/engine.md "Compiles off the serving
path"): a model's first programs compile in a background thread at load, a call whose exact program
is not compiled runs in a compiled larger one (inputs padded to it) while its own compiles in the
background, and JAX's persistent compilation cache is on (`crosspool_jax.execution.compile_cache`).

The runners here write the compilation cache to a temporary directory (`CROSSPOOL_COMPILATION_CACHE`),
unless an earlier test of the same process already set one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading

import jax
import numpy as np
import pytest
from pooled_helpers import GREEDY, References, Req, build_runner, drive, f32

from crosspool_jax.demo import demo_models
from crosspool_jax.execution import compile_cache
from crosspool_jax.execution.pooled_step import LaneShape, StepSpec
from crosspool_jax.execution.step_programs import FALLBACK_ENV, env_setting, spec_dominates
from crosspool_jax.execution.warm_programs import WARM_PROGRAMS_ENV

QWEN, DSV3 = "demo-qwen3-moe", "demo-deepseek-v3"


def _prompt(seed: int, n: int) -> tuple[int, ...]:
    return tuple(int(t) for t in np.random.default_rng(seed).integers(3, 250, n))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv(compile_cache.ENV, str(tmp_path_factory.mktemp("jax-cache")))
    dm = demo_models()
    models = {n: (dm[n].config, f32(dm[n].weights)) for n in (QWEN, DSV3)}
    yield models, References(models)
    mp.undo()


def _check(refs: References, reqs: list[Req], log) -> None:
    for r in reqs:
        want, reason = refs(r)
        assert log.tokens[r.rid] == want, f"{r.rid}: reference {want}, pooled {log.tokens[r.rid]}"
        assert log.finished[r.rid][0] == reason


def test_compilation_cache_dir_from_env_default_and_off(monkeypatch, tmp_path) -> None:
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv(compile_cache.ENV, "off")
        assert compile_cache.enable_compilation_cache() is None
        assert not jax.config.jax_compilation_cache_dir
        path = str(tmp_path / "cache")
        monkeypatch.setenv(compile_cache.ENV, path)
        assert compile_cache.enable_compilation_cache() == path
        assert jax.config.jax_compilation_cache_dir == path and (tmp_path / "cache").is_dir()
        assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_SECS
        # idempotent: a directory already set (by us or anyone) is kept, even by "off"
        for other in (str(tmp_path / "other"), "off"):
            monkeypatch.setenv(compile_cache.ENV, other)
            assert compile_cache.enable_compilation_cache() == path
        # default: $XDG_CACHE_HOME/crosspool/jax
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.delenv(compile_cache.ENV)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert compile_cache.enable_compilation_cache() == str(tmp_path / "xdg" / "crosspool" / "jax")
    finally:
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


def test_dominance_rule(demo) -> None:
    models, _ = demo
    runner = build_runner({QWEN: models[QWEN]}, split="1+1", kv_pages=4, warm_programs=0)
    cls = runner.store.models[QWEN].cls
    lane = LaneShape(cls, 1, 2, 2, 4, stop_width=runner.stop_width)
    want = StepSpec((lane,), True, 2)
    assert spec_dominates(want, want)
    bigger = dataclasses.replace(lane, groups=2, slots=4, tokens=4, max_pages=8,
                                 stop_width=2 * runner.stop_width)
    assert spec_dominates(StepSpec((bigger,), True, 4), want)
    assert not spec_dominates(StepSpec((dataclasses.replace(lane, slots=1, tokens=1),), True, 4), want)
    assert not spec_dominates(StepSpec((lane,), True, 1), want)  # fewer decode steps
    assert not spec_dominates(StepSpec((lane,), False, 2), want)  # prefill for decode
    assert not spec_dominates(StepSpec((lane, lane), True, 2), want)  # another lane structure
    assert not spec_dominates(StepSpec((lane,), True, 2, attention_schedule="persistent"), want)
    # split-KV extras: present in both or in neither
    assert not spec_dominates(StepSpec((dataclasses.replace(lane, extras=1),), True, 2), want)
    with_x = StepSpec((dataclasses.replace(lane, extras=1),), True, 2)
    assert spec_dominates(StepSpec((dataclasses.replace(lane, extras=2, max_pages=8),), True, 2), with_x)


def test_warm_programs_serve_a_first_request_without_compiling(demo, monkeypatch) -> None:
    """Adding a model queues its first programs for the background thread; once they are done, a
    first request compiles nothing on the serving path and still equals the reference."""
    models, refs = demo
    monkeypatch.delenv(WARM_PROGRAMS_ENV, raising=False)  # scripts/test.sh sets 0
    # warm_programs=None: the GroupRunner default, whatever build_runner passes by default
    runner = build_runner({QWEN: models[QWEN]}, split="1+1", kv_pages=16, prefill_chunk=32,
                          warm_programs=None, fallback=True)
    specs = runner.warm_specs(QWEN)
    assert len(specs) == runner.warm_programs == 4  # the CPU default
    assert set(runner._background) == set(specs)  # queued at load
    small = [sp for sp in specs if sp.lanes[0].slots == 1]
    assert {sp.decode for sp in small} == {True, False}  # the smallest decode and prefill first
    assert specs[:2] == small
    assert runner.gate_compiles()  # the gate (first and largest programs) is still compiling
    assert runner.wait_background(timeout=300)
    assert runner.gate_compiles() == []
    reqs = [Req("a", QWEN, _prompt(1, 5), 9), Req("b", QWEN, _prompt(2, 11), 6, stop_ids=(7, 9))]
    log = drive(runner, reqs)
    _check(refs, reqs, log)
    assert runner.blocked_compiles == 0 and runner.blocked_compile_seconds == 0.0
    assert runner.programs_built == 0  # nothing compiled on the serving path
    assert runner.background_built >= 2  # its prefill and decode programs came from the background
    assert runner.kv.pool_stats().pages_used == 0


def test_a_shape_not_compiled_runs_in_a_larger_program(demo, monkeypatch) -> None:
    """Without warm programs the first calls compile on the serving path; a later call of a
    smaller shape runs in one of those (padded), equals the reference, and its own program is
    queued for the background thread (GQA and MLA lanes)."""
    models, refs = demo
    runner = build_runner(models, split="1+1", kv_pages=32, prefill_chunk=32, warm_programs=0,
                          fallback=True)
    assert not runner._background
    big = [Req(f"{m[:7]}-big{i}", m, _prompt(10 + i, 20), 5) for m in models for i in range(3)]
    log = drive(runner, big)
    _check(refs, big, log)
    # every blocked wait is a call's own compile, or (timing: a fallback's background compile
    # still running when a call it dominates comes) a wait for that running compile
    own = [why for _, why, _ in runner.blocked_log if why == "its own compile"]
    assert len(own) == runner.programs_built > 0 and runner.blocked_compiles == len(runner.blocked_log)
    assert runner.blocked_compile_seconds > 0
    blocked, fallbacks = runner.blocked_compiles, runner.fallback_calls
    held = set(runner._programs) | set(runner._ready)
    queued: list[StepSpec] = []
    bg = runner._compile_in_background
    monkeypatch.setattr(runner, "_compile_in_background", lambda sp, *a: (queued.append(sp), bg(sp, *a)))
    small = [Req(f"{m[:7]}-small", m, _prompt(30, 5), 4) for m in models]
    log = drive(runner, small)
    _check(refs, small, log)
    assert runner.blocked_compiles == blocked  # nothing compiled on the serving path
    assert runner.fallback_calls > fallbacks
    prefills = [sp for sp in queued if not sp.decode]
    assert {sp.lanes[0].cls for sp in prefills} == {runner.store.models[m].cls for m in models}
    assert all(sp.lanes[0].slots == 1 and sp.lanes[0].tokens == 8 for sp in prefills)
    assert not held & set(queued)
    assert all(sp in runner._background or sp in runner._ready or sp in runner._programs for sp in queued)
    assert runner.kv.pool_stats().pages_used == 0


def test_a_new_models_requests_are_held_while_its_programs_compile(demo) -> None:
    """While a request of one model runs, a model added with warm programs queued has its waiting
    requests held (not admitted) until its gate programs are compiled, so its first call does not
    compile on the serving path; once they are, it is admitted and both equal the reference."""
    from crosspool_jax.execution.compile_queue import URGENT, CompileQueue

    models, refs = demo
    runner = build_runner(models, split="1+1", kv_pages=32, prefill_chunk=32, fallback=True)
    first = Req("a", QWEN, _prompt(3, 6), 12)
    runner.submit(first.rid, first.model, first.prompt, first.max_new, first.sampling, first.stop_ids)
    tokens = {first.rid: [], "b": []}
    for t in runner.step().tokens.get(first.rid, []):
        tokens[first.rid].append(t)
    assert runner.planner.running() == (first.rid,)
    gate = threading.Event()
    runner._executor = CompileQueue()  # its thread is held, so the new model's compiles stay queued
    runner._executor.submit(lambda: gate.wait(60), URGENT)
    runner.warm_programs = 4
    runner.warm_up(DSV3)  # what add_model does for a model loaded while requests run
    second = Req("b", DSV3, _prompt(4, 5), 4)
    runner.submit(second.rid, second.model, second.prompt, second.max_new, second.sampling, second.stop_ids)
    assert runner.held_models() == {DSV3}
    res = runner.step()
    assert "b" not in res.tokens and runner.held_steps >= 1
    assert runner.planner.info("b").status.name == "WAITING"
    gate.set()
    assert runner.wait_background(timeout=300)
    assert runner.held_models() == frozenset()
    for rid, toks in res.tokens.items():
        tokens[rid].extend(toks)
    while runner.has_work:
        for rid, toks in runner.step().tokens.items():
            tokens[rid].extend(toks)
    for r in (first, second):
        assert tokens[r.rid] == refs(r)[0]
    assert runner.kv.pool_stats().pages_used == 0


def test_hold_counts_other_models_waiting_requests_and_lifts_when_alone(demo) -> None:
    """Between one request's end and the next one's admission nothing runs: a model whose gate
    programs compile stays held while another model's requests wait; alone, it is not held."""
    from crosspool_jax.execution.compile_queue import URGENT, CompileQueue

    models, _refs = demo
    runner = build_runner(models, split="1+1", kv_pages=32, prefill_chunk=32, fallback=True)
    gate = threading.Event()
    runner._executor = CompileQueue()
    runner._executor.submit(lambda: gate.wait(60), URGENT)
    runner.warm_programs = 4
    runner.warm_up(DSV3)
    try:
        assert runner.held_models() == frozenset()  # no requests at all
        runner.submit("d", DSV3, _prompt(5, 5), 2, GREEDY, ())
        assert runner.held_models() == frozenset()  # only the held model has work: admit it
        runner.submit("q", QWEN, _prompt(6, 5), 2, GREEDY, ())
        assert not runner.planner.running()
        assert runner.held_models() == {DSV3}  # QWEN's request waits: it would be stalled
    finally:
        gate.set()
        runner.cancel("d")
        runner.cancel("q")
    assert runner.wait_background(timeout=300)
    assert runner.held_models() == frozenset()


def test_a_prompt_past_the_warm_box_is_held_while_its_programs_compile(demo) -> None:
    """A prompt longer than the warm box's context: its lane's top programs at its page width are
    queued at once; its prefill goes on inside the compiled width, then is held (no progress, its
    pages kept) while another request decodes, and resumes once they are compiled: no
    serving-path compile, both equal the reference."""
    from crosspool_jax.execution.compile_queue import URGENT, CompileQueue

    models, refs = demo
    runner = build_runner({QWEN: models[QWEN]}, split="1+1", kv_pages=64, prefill_chunk=16,
                          max_prefill_tokens=16, warm_programs=4, warm_slots=2, warm_context=32,
                          fallback=True)
    assert runner.wait_background(timeout=300)
    runner._poll_background()
    box = max(ln.max_pages for sp in (*runner._programs, *runner._ready) for ln in sp.lanes)
    short, long = Req("short", QWEN, _prompt(7, 6), 40), Req("long", QWEN, _prompt(8, 100), 5)
    tokens: dict[str, list[int]] = {short.rid: [], long.rid: []}

    def step() -> None:
        for rid, toks in runner.step().tokens.items():
            tokens[rid].extend(toks)

    runner.submit(short.rid, short.model, short.prompt, short.max_new, short.sampling, short.stop_ids)
    step()
    gate = threading.Event()
    runner._executor = CompileQueue()  # its thread is held: the long prompt's programs stay queued
    runner._executor.submit(lambda: gate.wait(60), URGENT)
    runner.submit(long.rid, long.model, long.prompt, long.max_new, long.sampling, long.stop_ids)
    try:
        for _ in range(4):
            step()
        assert runner.held_prefills() == {long.rid} and runner.held_prefill_steps >= 1
        span = runner.planner.prefill_span(long.rid)
        assert span is not None and 0 < span[0] <= 32 < span[1] == 100  # progress up to the box only
        assert len(tokens[short.rid]) > 1  # the other request kept decoding
    finally:
        gate.set()
    # its lane's top programs past the box (queued urgent) cover both requests from here on
    wider = [f for sp, f in runner._background.items() if sp.lanes[0].max_pages > box]
    assert wider and concurrent.futures.wait(wider, timeout=300).not_done == set()
    assert runner.held_prefills() == frozenset()
    while runner.has_work:
        step()
    runner.stop_background()  # the exact programs the fallback calls queued: not needed here
    for r in (short, long):
        assert tokens[r.rid] == refs(r)[0]
    assert runner.blocked_compiles == 0 and runner.programs_built == 0  # none on the serving path
    assert runner.kv.pool_stats().pages_used == 0


class _Guard:
    """A guard that records whether it is held (a stand-in for a group's step lock)."""

    def __init__(self) -> None:
        self.held = False
        self.entries = 0

    def __enter__(self) -> None:
        assert not self.held
        self.held, self.entries = True, self.entries + 1

    def __exit__(self, *exc: object) -> bool:
        self.held = False
        return False


def test_placement_holds_the_step_lock_only_around_arena_updates(demo, monkeypatch) -> None:
    """Adding a model encodes, copies and compiles its writers outside the stepping thread's lock;
    only allocation, each in-place write and the registration take it. The model then serves
    requests equal to the reference."""
    from crosspool_jax.memory.arena import ArenaStore

    models, refs = demo
    runner = build_runner({DSV3: models[DSV3]}, split="1+1", kv_pages=8, prefill_chunk=32)
    runner.remove_model(DSV3)
    guard, outside = _Guard(), []
    for meth in ("_encode", "_compiled"):
        orig = getattr(ArenaStore, meth)

        def wrapped(self, *a, _orig=orig, **k):
            outside.append(not guard.held)
            return _orig(self, *a, **k)

        monkeypatch.setattr(ArenaStore, meth, wrapped)
    runner.add_model(DSV3, *models[DSV3], guard=guard)
    tensors = len(runner.store.models[DSV3].slots)
    assert len(outside) >= 2 * tensors and all(outside)  # every encode and writer compile
    assert guard.entries >= tensors + 2  # allocation, one write per tensor, registration
    reqs = [Req("d", DSV3, _prompt(3, 7), 4)]
    _check(refs, reqs, drive(runner, reqs))
    assert runner.kv.pool_stats().pages_used == 0


def test_warm_programs_and_fallback_defaults_read_the_environment(demo, monkeypatch) -> None:
    """A runner not given `warm_programs` / `fallback` takes `$CROSSPOOL_WARM_PROGRAMS` /
    `$CROSSPOOL_COMPILE_FALLBACK` (what scripts/test.sh sets), else 4 and on (CPU); bad values
    are refused naming the variable."""
    monkeypatch.delenv(WARM_PROGRAMS_ENV, raising=False)
    monkeypatch.delenv(FALLBACK_ENV, raising=False)
    assert env_setting(WARM_PROGRAMS_ENV, 4) == 4 and env_setting(FALLBACK_ENV, True) is True
    for text, want in (("off", False), ("0", False), ("No", False), ("on", True), (" 1 ", True)):
        monkeypatch.setenv(FALLBACK_ENV, text)
        assert env_setting(FALLBACK_ENV, True) is want
    monkeypatch.setenv(WARM_PROGRAMS_ENV, "3")
    assert env_setting(WARM_PROGRAMS_ENV, 4) == 3
    for bad_name, bad in ((WARM_PROGRAMS_ENV, "-1"), (WARM_PROGRAMS_ENV, "two"), (FALLBACK_ENV, "maybe")):
        monkeypatch.setenv(bad_name, bad)
        with pytest.raises(ValueError, match=bad_name.replace("$", "")):
            env_setting(bad_name, True if bad_name == FALLBACK_ENV else 4)
    models, _ = demo
    monkeypatch.setenv(WARM_PROGRAMS_ENV, "0")
    monkeypatch.setenv(FALLBACK_ENV, "off")
    runner = build_runner({QWEN: models[QWEN]}, split="1+1", warm_programs=None, fallback=None)
    assert runner.warm_programs == 0 and runner.fallback is False and not runner._background
    monkeypatch.setenv(FALLBACK_ENV, "on")
    runner = build_runner({QWEN: models[QWEN]}, split="1+1", warm_programs=None, fallback=None)
    assert runner.fallback is True
