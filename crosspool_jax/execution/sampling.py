"""Token sampling on the device: greedy, temperature, top-k, top-p, with per-request seeds.

Pure functions over arrays, so they run inside jitted decode steps (control lowering: the host does
not see logits). A request's randomness depends only on (seed, position of the token), so a request
gives the same tokens whatever batch it runs in.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from crosspool_jax.errors import InvalidRequestError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 means off; top_p 1.0 means off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_tokens(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    positions: jax.Array,
) -> jax.Array:
    """Samples one token per row.

    logits [B, V] (any float dtype; computed in float32); temperature [B] f32 (0 = greedy);
    top_k [B] int32 (0 = off); top_p [B] f32 (1 = off); seeds [B] uint32 pairs as [B, 2] uint32;
    positions [B] int32 (the position the sampled token will occupy, so draws are reproducible).
    Returns [B] int32.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits / safe_t[:, None]
    order = descending_order(scaled)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    keep = rank < k[:, None]
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = keep & (mass_before < top_p[:, None])
    masked = jnp.where(keep, sorted_logits, -jnp.inf)

    def draw(seed: jax.Array, pos: jax.Array, row: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.wrap_key_data(seed, impl="threefry2x32"), pos)
        return jax.random.categorical(key, row)

    choice = jax.vmap(draw)(seeds, positions, masked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy_tok)


def descending_keys(x: jax.Array) -> jax.Array:
    """uint32 keys of float32 ``x`` whose ascending order is x's descending order, with -0.0 equal
    to 0.0 and NaN last: the order of ``jnp.argsort(-x)``. Sorted with a plain unsigned
    comparison instead of a float sort's NaN-aware comparator (which canonicalises both operands
    at every comparison): XLA's sort kernels are simpler to compile and run. On one H100 a decode
    step program compiled 1.34x faster and its sort ran ~1.3x faster (docs/benchmarks.md, "One
    H100, 2026-12-07 (night)"); XLA still emits its own sort (not CUB's) for these [B, V] rows."""
    x = jnp.where(x == 0, jnp.float32(0), x.astype(jnp.float32))  # -0.0 -> 0.0
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    ascending = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))
    return jnp.where(jnp.isnan(x), jnp.uint32(0xFFFFFFFF), ~ascending)


def descending_order(x: jax.Array) -> jax.Array:
    """[B, V] int32: each row's indices by descending value, ties in index order (a stable sort
    of `descending_keys`); equal to ``jnp.argsort(-x, axis=-1, stable=True)`` for float32 x."""
    iota = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return lax.sort((descending_keys(x), iota), dimension=x.ndim - 1, num_keys=1,
                    is_stable=True)[1]


def seed_words(seed: int) -> tuple[int, int]:
    """A 64-bit seed as the two uint32 words of a threefry key."""
    return (seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF
