"""benchmarks/hlo_kernels.py: kernels of an optimized HLO module counted by kind and step scope."""

from __future__ import annotations

import os
import subprocess
import sys

from benchmarks import hlo_kernels

# a hand-written module (HLO lines may not wrap): the entry runs a while loop whose body has a
# fusion of two scoped ops, a Triton call and a copy; the condition has one fusion; the reducer
# `add` is not executed
MODULE = """HloModule jit_body

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_computation (p0: f32[8]) -> f32[8] {
  %p0 = f32[8] parameter(0)
  %m = f32[8] multiply(%p0, %p0), metadata={op_name="jit(body)/shard_map/while/body/ffn/mul"}
  ROOT %e = f32[8] exponential(%m), metadata={op_name="jit(body)/shard_map/while/body/ffn/exp"}
}

%body (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[8] get-tuple-element(%t), index=1
  %fusion = f32[8] fusion(%x), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(body)/ffn/exp"}
  %cc = f32[8] custom-call(%fusion), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(body)/shard_map/while/body/attention_post/pallas_call"}
  %copy = f32[8] copy(%cc)
  ROOT %r = (s32[], f32[8]) tuple(%i, %copy)
}

%cond (t: (s32[], f32[8])) -> pred[] {
  %t = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %lt = pred[] fusion(%i), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(body)/while/cond/lt"}
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8] parameter(0)
  %zero = s32[] constant(0)
  %t = (s32[], f32[8]) tuple(%zero, %x)
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  ROOT %out = f32[8] get-tuple-element(%w), index=1
}
"""  # noqa: E501


def test_a_hand_written_module_counts_by_scope_and_kind() -> None:
    counts = hlo_kernels.count_module(MODULE)
    # the cond's fusion calls the same fused computation, so its scope is ffn too (its ops' names)
    assert counts == {("ffn", "fusion.kLoop"): 2, ("attention_post", "cc:__gpu$xla.gpu.triton"): 1,
                      ("other", "copy"): 1}
    comps, entry = hlo_kernels.parse_module(MODULE)
    assert entry == "main" and set(hlo_kernels.executed(comps, entry)) == {"main", "body", "cond"}


def test_scope_of_takes_the_most_common_named_scope() -> None:
    assert hlo_kernels.scope_of(["a/ffn/x", "a/sample/y", "a/sample/z", "a/q"]) == "sample"
    assert hlo_kernels.scope_of(["jit(f)/mul", "add"]) == "other"
    assert hlo_kernels.scope_of([]) == "other"


def test_a_real_cpu_dump_is_counted(tmp_path, capsys) -> None:
    """A jitted scan with named scopes dumped by XLA:CPU: every kernel of it is found and scoped."""
    script = (
        "import jax, jax.numpy as jnp\n"
        "def body(x):\n"
        "    def step(c, w):\n"
        "        with jax.named_scope('ffn'):\n"
        "            c = jnp.tanh(c @ w)\n"
        "        with jax.named_scope('sample'):\n"
        "            c = c + jnp.sort(c, axis=-1)\n"
        "        return c, None\n"
        "    return jax.lax.scan(step, x, jnp.ones((3, 8, 8)))[0]\n"
        "jax.jit(body)(jnp.ones((4, 8)))\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_dump_to={tmp_path}")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    hlo_kernels.main([str(tmp_path), "--min-kernels", "1"])
    text = capsys.readouterr().out
    assert "1 modules of >= 1 kernels" in text, text
    scopes = {line.split()[0] for line in text.split("kernels a module by step scope:")[1].split("\n\n")[0]
              .strip().splitlines()}
    assert {"ffn", "sample"} <= scopes, text
