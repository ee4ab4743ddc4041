"""A small Python client for the crosspool.v1 service."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from serving.crosspool.v1 import crosspool_pb2 as pb
from serving.crosspool.v1 import crosspool_pb2_grpc as pb_grpc

FINISH_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
DEFAULT_MAX_NEW_TOKENS = 32  # the server's default when a request leaves max_new_tokens out
# How the server's UNAVAILABLE details begin when it answered (rather than could not be reached):
# while it starts (no engine yet) and while it shuts down (new requests refused, live ones cut off).
SERVER_STARTING = "the server is starting"
SERVER_SHUTTING_DOWN = "the server is shutting down"


def server_unavailable(err: grpc.RpcError) -> bool:
    """True for an UNAVAILABLE the server itself sent because it is starting or shutting down (as
    opposed to a connection failure: no server, wrong address, TLS/plaintext mismatch)."""
    details = (err.details() or "") if hasattr(err, "details") else ""
    return err.code() == grpc.StatusCode.UNAVAILABLE and details.startswith(
        (SERVER_STARTING, SERVER_SHUTTING_DOWN)
    )


class CrossPoolClient:
    """Wraps a channel to a crosspool server. Use as a context manager, or call close().

    TLS: `tls_ca` (a PEM CA bundle; a self-signed server certificate is its own CA) or `tls=True`
    (the system's root certificates). `tls_server_name` overrides the name checked against the
    server's certificate (default: the host part of `address`). Without either: plaintext."""

    def __init__(
        self,
        address: str,
        auth_token: str | None = None,
        tls_ca: str | None = None,
        tls: bool = False,
        tls_server_name: str | None = None,
    ):
        self.address = address
        if tls or tls_ca:
            from serving.tls import channel_credentials

            options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
            self.channel = grpc.secure_channel(address, channel_credentials(tls_ca), options=options)
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.CrossPoolStub(self.channel)
        self._md = (("authorization", f"Bearer {auth_token}"),) if auth_token else None

    def __enter__(self) -> CrossPoolClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate_stream(
        self,
        model: str,
        prompt: str | None = None,
        prompt_ids: Sequence[int] | None = None,
        max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Any:
        """The streaming call: an iterator of GenerateResponse that is also a grpc.Call (`.cancel()`).
        `max_new_tokens` None leaves it out of the request (the server's default, 32); any int is sent
        as is (the server refuses < 1 with INVALID_ARGUMENT, as the local path does)."""
        sampling = pb.SamplingParams()
        for field, value in (
            ("temperature", temperature),
            ("top_k", top_k),
            ("top_p", top_p),
            ("seed", seed),
        ):
            if value is not None:
                setattr(sampling, field, value)
        req = pb.GenerateRequest(
            model=model,
            request_id=request_id,
            prompt=prompt or "",
            prompt_ids=list(prompt_ids or ()),
            sampling=sampling,
            stop_token_ids=list(stop_token_ids),
            ignore_eos=ignore_eos,
        )
        if max_new_tokens is not None:
            req.max_new_tokens = max_new_tokens
        return self.stub.Generate(req, timeout=timeout, metadata=self._md)

    def generate(self, model: str, **kw: Any) -> dict[str, Any]:
        """Runs a whole generation: {"token_ids", "text", "finish_reason", "usage", "timestamps_ns"}."""
        out: dict[str, Any] = {"token_ids": [], "text": "", "timestamps_ns": []}
        last: pb.GenerateResponse | None = None
        for r in self.generate_stream(model, **kw):
            out["token_ids"].append(r.token_id)
            out["text"] += r.text
            out["timestamps_ns"].append(r.timestamp_unix_nanos)
            last = r
        if last is not None:
            out["finish_reason"] = FINISH_NAMES.get(last.finish_reason, "unknown")
            out["usage"] = {
                "prompt_tokens": last.usage.prompt_tokens,
                "completion_tokens": last.usage.completion_tokens,
                "total_tokens": last.usage.total_tokens,
            }
        return out

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), metadata=self._md).models)

    def load_model(self, name: str, path: str) -> pb.ModelInfo:
        return self.stub.LoadModel(pb.LoadModelRequest(name=name, path=path), metadata=self._md).model

    def unload_model(self, name: str) -> int:
        return self.stub.UnloadModel(pb.UnloadModelRequest(name=name), metadata=self._md).failed_requests

    def sleep_model(self, name: str, to_disk: bool = False) -> str:
        """Puts a model to sleep (weights to host memory; `to_disk`: dropped to its checkpoint);
        returns its state."""
        return self.stub.SleepModel(pb.SleepModelRequest(name=name, to_disk=to_disk),
                                    metadata=self._md).state

    def wake_model(self, name: str) -> str:
        """Wakes a sleeping model (weights back into the arena); returns its state."""
        return self.stub.WakeModel(pb.WakeModelRequest(name=name), metadata=self._md).state

    def stats(self) -> pb.GetStatsResponse:
        return self.stub.GetStats(pb.GetStatsRequest(), metadata=self._md)
