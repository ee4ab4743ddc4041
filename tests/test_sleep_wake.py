"""Sleeping models (issue 20): more models registered than the arena's weight space holds.

One engine (mode shared, one device) whose weight space holds two demo-mixtral-shaped models;
three are registered, so the third's add puts the least recently used idle one to sleep.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import pytest

from crosspool_jax.demo import demo_models
from crosspool_jax.engine import EngineConfig, PooledEngine
from crosspool_jax.engine_api import FINISH_CANCELLED, make_request
from crosspool_jax.errors import InvalidRequestError
from crosspool_jax.execution.step_programs import FALLBACK_ENV
from crosspool_jax.memory.model_states import ModelState, ModelStates
from crosspool_jax.memory.topology import Role
from crosspool_jax.models.reference import ReferenceGenerator

MIX = demo_models()["demo-mixtral"]
PROMPT = [5, 9, 33, 7]
LONG = 16  # tokens of the request that streams while another model wakes


def _weights(scale: float):  # distinct models of one class: their outputs differ
    return jax.tree.map(lambda a: a.astype(jnp.float32) * scale, MIX.weights)


WEIGHTS = {"a": _weights(1.0), "b": _weights(1.3), "c": _weights(0.8)}


def _reference(name: str, n: int) -> list[int]:
    return list(ReferenceGenerator(MIX.config, WEIGHTS[name]).generate(PROMPT, n).token_ids)


def _tokens(eng: PooledEngine, name: str, n: int) -> list[int]:
    return [ev.token_id for ev in eng.submit(make_request(name, PROMPT, n)).events()
            if ev.token_id is not None]


def _free_rows(eng: PooledEngine) -> int:
    return eng.groups[0].store._alloc[Role.KV].free_rows


def _kv_used(eng: PooledEngine) -> int:
    return sum(used for _, used, _ in eng.stats().kv_pages)


def _states(eng: PooledEngine) -> dict[str, str]:
    return dict(eng.stats().model_states)


def test_registry_lru_order() -> None:
    now = [0.0]
    st = ModelStates(clock=lambda: now[0])
    for i, n in enumerate("abc"):
        now[0] = float(i)
        st.add(n)
    st.request_started("a")
    assert st.lru_idle() == "b"  # a has a live request
    now[0] = 5.0
    st.request_ended("a")
    now[0] = 10.0
    st.request_started("b")
    st.request_ended("b")
    assert st.lru_idle() == "c" and st.lru_idle(frozenset({"c"})) == "a"
    st.set_state("c", ModelState.SLEEPING)
    assert st.lru_idle() == "a" and st.idle_longer_than(4.0) == ["a"]
    now[0] = 20.0
    assert st.idle_longer_than(4.0) == ["a", "b"]


@pytest.fixture(scope="module")
def eng():
    # fallback on (scripts/test.sh turns it off): a step whose mix of requests differs from the
    # ones compiled runs in a larger program, which "no compile on wake" below relies on
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FALLBACK_ENV, "on")
        e = PooledEngine(mode="shared", pools="1",
                         config=EngineConfig(arena_bytes=8 << 20, weights_fraction=0.3,
                                             attention_backend="reference", steps_per_call=2))
    yield e
    e.shutdown(timeout=0)


def test_sleep_wake_cycle(eng: PooledEngine) -> None:
    """Eviction order, wake under load, outputs equal before/after, no compile on wake, sleep with
    live requests refused, pages and rows back after every transition."""
    free0 = _free_rows(eng)
    ref = {n: _reference(n, 6) for n in WEIGHTS}
    eng.add_model("a", MIX.config, WEIGHTS["a"])
    eng.add_model("b", MIX.config, WEIGHTS["b"])
    rows = (free0 - _free_rows(eng)) // 2
    # both at once (the mix the wake below runs: its programs are compiled here, not on the wake)
    hs = {n: eng.submit(make_request(n, PROMPT, k)) for n, k in (("a", LONG), ("b", 6))}
    before = {n: [ev.token_id for ev in h.events() if ev.token_id is not None] for n, h in hs.items()}
    assert before == {"a": _reference("a", LONG), "b": ref["b"]}
    before["a"] = _tokens(eng, "a", 6)  # a used last: b is the LRU idle model
    assert before["a"] == ref["a"]
    eng.add_model("c", MIX.config, WEIGHTS["c"])  # does not fit: b goes to sleep
    assert _states(eng) == {"a": "resident", "b": "sleeping", "c": "resident"}
    assert _free_rows(eng) == free0 - 2 * rows and _kv_used(eng) == 0
    group = eng.groups[0]
    built, blocked = group.programs_built, group.blocked_compiles
    # wake under load: c streams a long request while b's request wakes b (a, idle, goes to sleep)
    hc = eng.submit(make_request("c", PROMPT, LONG))
    first = hc.next_event(timeout=120)
    assert first is not None and first.token_id is not None
    with pytest.raises(InvalidRequestError, match="live requests"):  # refused, not drained
        eng.sleep("c")
    assert _tokens(eng, "b", 6) == before["b"]  # b woke: the same tokens as before its sleep
    assert _states(eng) == {"a": "sleeping", "b": "resident", "c": "resident"}
    got_c = [first.token_id] + [ev.token_id for ev in hc.events() if ev.token_id is not None]
    assert got_c == _reference("c", LONG)
    assert group.programs_built == built and group.blocked_compiles == blocked  # no compile on wake
    assert _free_rows(eng) == free0 - 2 * rows and _kv_used(eng) == 0
    # explicit sleep / wake; nothing lost
    eng.sleep("b")
    assert _free_rows(eng) == free0 - rows and _states(eng)["b"] == "sleeping"
    eng.wake("a")
    assert _states(eng) == {"a": "resident", "b": "sleeping", "c": "resident"}
    assert _tokens(eng, "a", 6) == before["a"]
    eng.sleep("a")
    eng.sleep("c")
    assert _free_rows(eng) == free0 and _kv_used(eng) == 0
    # a request to a sleeping model cancelled while it waits for the wake
    h = eng.submit(make_request("a", PROMPT, 200))
    assert h.cancel()
    assert [ev for ev in h.events()][-1].finish_reason == FINISH_CANCELLED
    deadline = time.monotonic() + 60
    while _states(eng)["a"] == "waking" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert eng.unload_model("b") == 0 and "b" not in _states(eng)
    st = eng.stats()
    assert st.failed == 0 and _kv_used(eng) == 0


def test_idle_sleep() -> None:
    e = PooledEngine(mode="shared", pools="1",
                     config=EngineConfig(arena_bytes=8 << 20, attention_backend="reference",
                                         steps_per_call=2, idle_sleep_s=0.2))
    try:
        e.add_model("a", MIX.config, WEIGHTS["a"])
        deadline = time.monotonic() + 30
        while _states(e)["a"] != "sleeping" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _states(e)["a"] == "sleeping"
        assert _tokens(e, "a", 4) == _reference("a", 4)
    finally:
        e.shutdown(timeout=0)


def test_wake_benchmark_quick(tmp_path) -> None:
    """benchmarks/wake.py --quick runs (so it cannot rot): wake compiles nothing, tokens equal, and
    the replay (3 models registered on disk from one checkpoint, 1 resident) loses nothing."""
    from benchmarks.wake import main

    res = main(["--quick", "--repeats", "1", "--models", "3", "--resident", "1", "--requests", "4",
                "--new", "2", "--disk-checkpoints", "1", "--ckpt-dir", str(tmp_path),
                "--json", str(tmp_path / "wake.json")])
    w, r = res["wake"], res["replay"]
    assert w["programs_compiled_on_wake"] == 0 and w["tokens_equal"] and w["wake_s"] > 0
    assert w["floor_s"] > 0 and w["disk_load_s"] > 0 and w["disk_read_s"] > 0
    assert r["lost"] == 0 and r["completed"] == 4 and r["weight_space_holds"] == 1, r["errors"]
    assert r["ttft_cold_disk"]["n"] >= 1 and r["peak_resident"] == 1


@pytest.mark.parametrize("split", ["colocated", "2+1"])
def test_copy_out_in_restores_every_row_in_chunks(split: str, monkeypatch) -> None:
    """`ArenaStore.copy_out` / `copy_in` in chunks smaller than a block (a ragged last chunk), on
    one device and on a KV+weights split (the writers' zero shards on the other role's devices):
    the model comes back at other rows with every row equal, the other model's rows untouched."""
    import dataclasses

    import numpy as np

    from crosspool_jax.memory import arena as arena_mod
    from crosspool_jax.memory.arena import ArenaStore
    from crosspool_jax.memory.topology import PoolTopology
    from pallas_kernels.page_layout import PoolLayout

    layout = PoolLayout(16384, "float32", 64, 240)  # room for 3 models of ~1 MB
    if split == "colocated":
        store = ArenaStore(None, layout, 220, colocated=jax.devices()[0])
    else:
        store = ArenaStore(PoolTopology.split(split, jax.devices()[:3]), layout, 60)
    monkeypatch.setattr(arena_mod, "COPY_CHUNK_BYTES", 7 * store.row_bytes())

    def rows_of(name: str) -> dict[tuple[Role, int], np.ndarray]:
        ma, r = store.models[name], store.layout.row_elems
        shards = {s.device: np.asarray(s.data).reshape(-1, r) for s in store.arena.addressable_shards}
        return {(role, i): shards[d][ma.base[role]:ma.base[role] + ma.rows(role)]
                for role in Role for i, d in enumerate(store._pool_devices(role))}

    store.place_model_random("x", MIX.config, seed=1)
    store.place_model_random("y", MIX.config, seed=2)
    x0, y0 = rows_of("x"), rows_of("y")
    assert len(store.copy_chunks(store.models["x"].rows(Role.WEIGHTS))) > 2
    host = store.copy_out("x")
    store.remove_model("x")
    store.place_model_random("z", dataclasses.replace(MIX.config), seed=3)  # takes x's old rows
    ma = store.copy_in("x", host)
    store.models["x"] = ma
    assert ma.base != store.models["z"].base
    x1 = rows_of("x")
    assert x1.keys() == x0.keys() and all(np.array_equal(x0[k], x1[k]) for k in x0)
    assert all(np.array_equal(y0[k], v) for k, v in rows_of("y").items())
    assert host.nbytes == sum(v.nbytes for v in x0.values())


def test_registry_disk_tier_order() -> None:
    now = [0.0]
    st = ModelStates(clock=lambda: now[0])
    st.add("a")
    st.add("d", ModelState.ON_DISK)
    for i, n in enumerate("bc"):
        now[0] = 1.0 + i
        st.add(n)
        st.set_state(n, ModelState.SLEEPING)
    assert st.lru_sleeping({"a", "b", "c", "d"}) == "b"  # a resident, d on disk already
    assert st.lru_sleeping({"c"}) == "c" and st.lru_sleeping(set()) is None
    assert st.lru_idle() == "a"  # an on-disk model is never put to sleep
    assert [i.sleeps for i in st.snapshot()] == [0, 1, 1, 0]


def test_disk_tier(tmp_path) -> None:
    """Models loaded from checkpoints: registered on disk (read at their first request), dropped
    from host memory to disk past `host_weights_bytes` (least recently used first), re-read on
    wake with the same tokens; a model added from memory stays in host memory; sleep(to_disk);
    rows and pages back; unload in every state."""
    from checkpoints import save
    from crosspool_jax.errors import CheckpointError

    for n in "abc":
        save(tmp_path / n, MIX.config, WEIGHTS[n])
    e = PooledEngine(mode="shared", pools="1",
                     config=EngineConfig(arena_bytes=8 << 20, weights_fraction=0.3,
                                         attention_backend="reference", steps_per_call=2))
    try:
        free0 = _free_rows(e)
        e.load_model("a", str(tmp_path / "a"))
        host_bytes = (free0 - _free_rows(e)) * e.groups[0].store.row_bytes()
        e._host_budget = int(1.5 * host_bytes)  # host memory holds one sleeping model
        for n in "bc":
            e.load_model(n, str(tmp_path / n), on_disk=True)
        assert _states(e) == {"a": "resident", "b": "on_disk", "c": "on_disk"}
        assert _free_rows(e) == free0 - host_bytes // e.groups[0].store.row_bytes()
        with pytest.raises(CheckpointError):
            e.load_model("x", str(tmp_path / "missing"), on_disk=True)
        assert "x" not in _states(e)
        assert _tokens(e, "b", 6) == _reference("b", 6)  # read from disk at its first request
        assert _tokens(e, "c", 6) == _reference("c", 6)  # a (LRU) goes to sleep for it
        assert _states(e) == {"a": "sleeping", "b": "resident", "c": "resident"}
        e.add_model("mem", MIX.config, _weights(1.1))  # b sleeps: host over budget, a to disk
        assert _states(e) == {"a": "on_disk", "b": "sleeping", "c": "resident", "mem": "resident"}
        assert _tokens(e, "a", 6) == _reference("a", 6)  # c sleeps for it, then b (LRU) to disk
        assert _states(e) == {"a": "resident", "b": "on_disk", "c": "sleeping", "mem": "resident"}
        with pytest.raises(InvalidRequestError, match="checkpoint"):
            e.sleep("mem", to_disk=True)
        e._host_budget = host_bytes // 2
        e.sleep("mem")  # c to disk; mem has no checkpoint: it stays in host memory, over budget
        assert _states(e) == {"a": "resident", "b": "on_disk", "c": "on_disk", "mem": "sleeping"}
        e.sleep("a", to_disk=True)
        assert _states(e) == {"a": "on_disk", "b": "on_disk", "c": "on_disk", "mem": "sleeping"}
        assert set(e._host) == {"mem"} and _free_rows(e) == free0 and _kv_used(e) == 0
        e.wake("b")  # explicit wake from disk
        assert _states(e)["b"] == "resident" and _tokens(e, "b", 6) == _reference("b", 6)
        assert [e.unload_model(n) for n in ("a", "b", "c")] == [0, 0, 0]
        e._wait_unloaded("b")  # the group's worker frees a resident model's rows
        assert _states(e) == {"mem": "sleeping"} and _free_rows(e) == free0
        assert e.stats().failed == 0 and _kv_used(e) == 0
    finally:
        e.shutdown(timeout=0)
