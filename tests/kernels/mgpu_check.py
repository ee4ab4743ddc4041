"""What the Mosaic GPU kernel tests share: Mosaic GPU's interpreter with its race detector on, and
cross-lowering a kernel for an abstract H200 on this CPU-only machine."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax._src.pallas.mosaic_gpu.interpret import params

from pallas_kernels import attention_core

H200_SMS = 132


@dataclasses.dataclass(frozen=True, kw_only=True)
class RaceCheckingParams(params.InterpretGPUParams):
    detect_races: bool = True


@contextlib.contextmanager
def races_detected(monkeypatch: Any, *jitted: Any) -> Iterator[None]:
    """The kernels' interpret backend with the race detector on; the caches of the `jitted`
    wrappers are cleared before and after, so their kernels are traced afresh under it."""
    monkeypatch.setattr(params, "InterpretGPUParams", RaceCheckingParams)
    for f in jitted:
        f.clear_cache()
    yield
    for f in jitted:
        f.clear_cache()


def lowered_for_h200(monkeypatch: Any, fn: Callable, args: tuple) -> str:
    """`fn` traced on `args` (ShapeDtypeStructs) and lowered for CUDA with an H200's SM count: the
    whole Pallas -> Mosaic GPU lowering, layout inference and shared-memory check; only the final
    compile needs the chip. Returns the lowered module's text."""
    monkeypatch.setattr(attention_core, "num_sms", lambda: H200_SMS)
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
