"""What one request may cost the server: size limits checked before anything is queued.

`RequestLimits` holds the limits (defaults below, settable in the config file's `[limits]` table and
by `crosspool serve --max-...` flags; docs/serving.md lists them). The `check_*` functions are pure:
they look at a request's fields and raise `InvalidRequestError` with a one-line message that names
the limit (`... the limit is 128 (max_request_id_bytes)`), so every front end (the gRPC servicer, an
HTTP front end) refuses the same requests with the same words before the engine sees them. The
engine refuses on its own a stop-id list longer than its step programs take
(`crosspool_jax.engine.EngineConfig.max_stop_ids`, which `serving.settings.make_engine` sets from
`max_stop_token_ids`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from crosspool_jax.engine_api import Request
from crosspool_jax.errors import InvalidRequestError

# The most bytes of request ids GetStats may list (max_live_requests x max_request_id_bytes): well
# under the 4 MiB a default gRPC client takes in one message (`RequestLimits.check_stats_size`)
MAX_STATS_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """Per-request limits of the server (every field >= 1).

    max_request_id_bytes: UTF-8 bytes of a client's request id (echoed in every response and listed
      in GetStats' live_request_ids).
    max_model_name_bytes: UTF-8 bytes of a model name (Generate's model, LoadModel / UnloadModel).
    max_path_bytes: UTF-8 bytes of LoadModel's checkpoint path.
    max_prompt_bytes: UTF-8 bytes of a prompt text (checked before it is tokenized).
    max_prompt_tokens: tokens of a prompt (prompt_ids as sent, or the text once tokenized).
    max_new_tokens: most tokens one request may ask to generate.
    max_stop_token_ids: stop token ids of one request (the engine's step programs are built for this
      many: `EngineConfig.max_stop_ids`).
    max_stop_strings: stop strings of one request (front ends that take them, e.g. HTTP).
    max_stop_string_bytes: UTF-8 bytes of one stop string.
    """

    max_request_id_bytes: int = 128
    max_model_name_bytes: int = 256
    max_path_bytes: int = 4096
    max_prompt_bytes: int = 1 << 20
    max_prompt_tokens: int = 131072
    max_new_tokens: int = 131072
    max_stop_token_ids: int = 16
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f.name} must be an integer >= 1, got {v!r}")

    def stats_bytes(self, max_live_requests: int) -> int:
        """An upper bound of GetStats' live_request_ids in bytes (ids plus 3 bytes of framing each)."""
        return max_live_requests * (self.max_request_id_bytes + 3)

    def check_stats_size(self, max_live_requests: int) -> None:
        """Raises ValueError when GetStats could list more request-id bytes than `MAX_STATS_BYTES`
        (1 MiB; a default gRPC client takes at most 4 MiB per message)."""
        n = self.stats_bytes(max_live_requests)
        if n > MAX_STATS_BYTES:
            raise ValueError(
                f"max_live_requests ({max_live_requests}) x max_request_id_bytes "
                f"({self.max_request_id_bytes}) would make GetStats list up to {n} bytes of request ids; "
                f"keep it under {MAX_STATS_BYTES} (1 MiB)")


LIMIT_NAMES = tuple(f.name for f in dataclasses.fields(RequestLimits))


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def _too_big(what: str, n: int, unit: str, limit: int, name: str) -> InvalidRequestError:
    return InvalidRequestError(f"{what} is {n} {unit}; the limit is {limit} ({name})")


def check_text(value: str, what: str, limit: int, name: str) -> None:
    """Raises InvalidRequestError when `value` has more than `limit` UTF-8 bytes; `what` and `name`
    (the limit's field name) go into the message."""
    if len(value) > limit or _utf8_len(value) > limit:  # len() first: cheap for huge values
        raise _too_big(what, _utf8_len(value), "bytes", limit, name)


def check_count(n: int, what: str, unit: str, limit: int, name: str) -> None:
    """Raises InvalidRequestError when `n` (items of `unit`) is more than `limit`."""
    if n > limit:
        raise _too_big(what, n, unit, limit, name)


def check_generate(
    limits: RequestLimits,
    *,
    model: str,
    request_id: str = "",
    prompt: str = "",
    prompt_ids: Sequence[int] = (),
    max_new_tokens: int | None = None,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
) -> None:
    """The fields of a generate call as received, before the prompt is tokenized: model name and
    request id bytes, prompt text bytes, prompt ids count, max_new_tokens, stop ids and stop strings.
    Raises InvalidRequestError naming the first limit passed."""
    check_text(model, "the model name", limits.max_model_name_bytes, "max_model_name_bytes")
    check_text(request_id, "request_id", limits.max_request_id_bytes, "max_request_id_bytes")
    check_text(prompt, "the prompt text", limits.max_prompt_bytes, "max_prompt_bytes")
    check_count(len(prompt_ids), "prompt_ids", "tokens", limits.max_prompt_tokens, "max_prompt_tokens")
    if max_new_tokens is not None:
        check_count(max_new_tokens, "max_new_tokens", "tokens", limits.max_new_tokens, "max_new_tokens")
    check_count(len(stop_token_ids), "stop_token_ids", "ids", limits.max_stop_token_ids,
                "max_stop_token_ids")
    check_count(len(stop_strings), "the stop strings", "strings", limits.max_stop_strings,
                "max_stop_strings")
    for s in stop_strings:
        check_text(s, "a stop string", limits.max_stop_string_bytes, "max_stop_string_bytes")


def check_request(limits: RequestLimits, request: Request) -> None:
    """An engine `Request` as it will be submitted (prompt tokenized, default stop ids filled in):
    the limits of `check_generate` on its fields (the prompt counted in tokens)."""
    check_count(len(request.prompt_ids), "the prompt", "tokens", limits.max_prompt_tokens,
                "max_prompt_tokens")
    check_generate(limits, model=request.model, request_id=request.request_id,
                   max_new_tokens=request.max_new_tokens, stop_token_ids=request.stop_token_ids)


def check_model_call(limits: RequestLimits, name: str, path: str = "") -> None:
    """LoadModel / UnloadModel fields: the model name's and the path's bytes."""
    check_text(name, "the model name", limits.max_model_name_bytes, "max_model_name_bytes")
    check_text(path, "the path", limits.max_path_bytes, "max_path_bytes")
