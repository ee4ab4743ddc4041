"""The single-model reference generation path: no pools, a contiguous KV cache, jitted prefill and
decode. It is the oracle the pooled engine is compared with, token for token.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.errors import InvalidRequestError
from crosspool_jax.execution.sampling import SamplingParams, sample_tokens, seed_words
from crosspool_jax.models.attention import Cache, init_cache
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.params import ModelWeights
from crosspool_jax.models.transformer import forward

GREEDY = SamplingParams()


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    token_ids: tuple[int, ...]  # generated ids only (the stop token included when one was hit)
    finish_reason: str  # "stop" (a stop token was generated) | "length" (max_new_tokens reached)


def validate_request(
    cfg: ModelConfig, prompt_ids: Sequence[int], max_new_tokens: int, stop_token_ids: Sequence[int] = ()
) -> None:
    """Raises InvalidRequestError for an empty/too-long prompt, ids outside the vocabulary, bad lengths."""
    if len(prompt_ids) == 0:
        raise InvalidRequestError("the prompt is empty")
    if max_new_tokens < 1:
        raise InvalidRequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    bad = [t for t in prompt_ids if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise InvalidRequestError(
            f"prompt token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size}) ({len(bad)} such ids)"
        )
    bad = [t for t in stop_token_ids if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise InvalidRequestError(f"stop token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    total = len(prompt_ids) + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise InvalidRequestError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
            f"model's max_position_embeddings ({cfg.max_position_embeddings})"
        )


@jax.jit
def _first_token(logits: jax.Array, last: jax.Array, samp: tuple) -> jax.Array:
    """The token after the prompt: samples row `last` (int32 scalar, the prompt's last position) of
    prefill's logits [1, T, V]; one program per (T, V) for every prompt length, where sampling op by
    op would dispatch (and on first use compile) each of its ops apart. -> [1] int32."""
    row = jax.lax.dynamic_index_in_dim(logits, last, axis=1, keepdims=False)
    return sample_tokens(row, *samp, positions=(last + 1)[None])


def _bucket(n: int, cap: int, floor: int = 16) -> int:
    """Next power of two >= n (at least `floor`), at most `cap`: bounds the number of compilations."""
    return min(max(floor, 1 << (max(n, 1) - 1).bit_length()), cap)


class ReferenceGenerator:
    """Generates for one model, one request at a time. Compiles once per (prompt bucket, cache bucket)."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights):
        self.cfg = cfg
        self.weights = weights
        self.cache_dtype = weights.attn["embed"].dtype  # the KV cache holds activations of this dtype

    @functools.cached_property
    def _prefill(self) -> Any:
        def prefill(weights: ModelWeights, tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
            positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
            return forward(self.cfg, weights, tokens, positions, cache)

        # donates: the cache
        return jax.jit(prefill, donate_argnums=(2,))

    @functools.cached_property
    def _decode(self) -> Any:
        def decode(weights: ModelWeights, token: jax.Array, pos: jax.Array, cache: Cache, samp: tuple):
            logits, cache = forward(self.cfg, weights, token[:, None], pos[:, None], cache)
            nxt = sample_tokens(logits[:, 0], *samp, positions=pos + 1)
            return nxt, cache

        # donates: the cache
        return jax.jit(decode, donate_argnums=(3,))

    def prompt_logits(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Full-prompt forward: logits [T, V] float32 (what parity tests compare with HF)."""
        validate_request(self.cfg, prompt_ids, 1)
        n = len(prompt_ids)
        t_pad = _bucket(n, self.cfg.max_position_embeddings)
        cache = init_cache(self.cfg, 1, t_pad, self.cache_dtype)
        tokens = jnp.zeros((1, t_pad), jnp.int32).at[0, :n].set(jnp.asarray(prompt_ids, jnp.int32))
        logits, _ = self._prefill(self.weights, tokens, cache)
        return np.asarray(logits[0, :n])

    def stream_tokens(
        self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams = GREEDY
    ) -> Iterator[int]:
        """Yields max_new_tokens sampled ids, one at a time; each decode step runs only when the
        consumer asks for the next id, so a consumer can stop (stop token, cancel) between tokens."""
        validate_request(self.cfg, prompt_ids, max_new_tokens)
        n = len(prompt_ids)
        cap = self.cfg.max_position_embeddings
        cache_len = _bucket(n + max_new_tokens, cap)
        t_pad = min(_bucket(n, cap), cache_len)
        cache = init_cache(self.cfg, 1, cache_len, self.cache_dtype)
        tokens = jnp.zeros((1, t_pad), jnp.int32).at[0, :n].set(jnp.asarray(prompt_ids, jnp.int32))
        samp = (
            jnp.asarray([sampling.temperature], jnp.float32),
            jnp.asarray([sampling.top_k], jnp.int32),
            jnp.asarray([sampling.top_p], jnp.float32),
            jnp.asarray([seed_words(sampling.seed)], jnp.uint32),
        )
        logits, cache = self._prefill(self.weights, tokens, cache)
        tok = _first_token(logits, jnp.asarray(n - 1, jnp.int32), samp)
        for i in range(max_new_tokens):
            if i:  # the token at position n + i - 1 goes in, the one at n + i comes out
                tok, cache = self._decode(self.weights, tok, jnp.asarray([n + i - 1], jnp.int32), cache, samp)
            yield int(tok[0])

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingParams = GREEDY,
        stop_token_ids: Sequence[int] = (),
    ) -> GenerationResult:
        """Prefill the prompt, then decode until a stop token or max_new_tokens."""
        validate_request(self.cfg, prompt_ids, max_new_tokens, stop_token_ids)
        stops = {int(s) for s in stop_token_ids}
        out: list[int] = []
        for t in self.stream_tokens(prompt_ids, max_new_tokens, sampling):
            out.append(t)
            if t in stops:
                return GenerationResult(tuple(out), "stop")
        return GenerationResult(tuple(out), "length")


def generate_cli(args: Any) -> int:
    """`crosspool generate` (reference mode): prints one JSON object per line."""
    from checkpoints import load_model  # local import: the CLI is the only caller needing checkpoints

    model = load_model(args.model)
    if args.prompt is not None:
        if model.tokenizer is None:
            raise InvalidRequestError(f"{args.model}: --prompt needs a tokenizer.json; use --prompt-ids")
        prompt_ids = model.tokenizer.encode(args.prompt)
    else:
        prompt_ids = list(args.prompt_ids)
    stop_ids = list(model.config.eos_token_ids if args.stop_ids is None else args.stop_ids)
    sampling = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    result = ReferenceGenerator(model.config, model.weights).generate(
        prompt_ids, args.max_new_tokens, sampling, stop_ids
    )
    line: dict[str, Any] = {"token_ids": list(result.token_ids), "finish_reason": result.finish_reason}
    if model.tokenizer is not None:
        line["text"] = model.tokenizer.decode(list(result.token_ids))
    print(json.dumps(line), file=sys.stdout, flush=True)
    return 0
