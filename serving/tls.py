"""TLS for the crosspool.v1 server and client: PEM files read and checked up front, so a missing,
unreadable or wrong file is one clear line (`TLSError`) instead of a gRPC bind failure or a
connection that never becomes ready."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent import futures

import grpc

from crosspool_jax.errors import CrossPoolError

_CERT_MARK = b"-----BEGIN CERTIFICATE-----"


class TLSError(CrossPoolError, ValueError):
    """A TLS certificate, key or CA file that cannot be used."""


def read_pem(path: str, what: str, key: bool = False) -> bytes:
    """The bytes of the PEM file `path` (`what` names it in errors, e.g. "--tls-cert"); checks that it
    holds a certificate (or, with key=True, a private key)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TLSError(f"{what} {path}: cannot read: {e.strerror or e}") from None
    if key:
        if b"-----BEGIN" not in data or b"PRIVATE KEY-----" not in data:
            raise TLSError(f"{what} {path}: not a PEM private key (no 'BEGIN ... PRIVATE KEY' block)")
    elif _CERT_MARK not in data:
        raise TLSError(f"{what} {path}: not a PEM certificate (no 'BEGIN CERTIFICATE' block)")
    return data


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silences fd 2 (gRPC's C core logs a refused key there) for the short probe below."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def server_credentials(cert_path: str, key_path: str) -> grpc.ServerCredentials:
    """`grpc.ssl_server_credentials` from a PEM certificate chain and its private key. The pair is tried
    on a throw-away listener on a free loopback port first: gRPC refuses a key that does not match
    the certificate only when it binds, with the same error as a port in use."""
    cert = read_pem(cert_path, "--tls-cert")
    key = read_pem(key_path, "--tls-key", key=True)
    creds = grpc.ssl_server_credentials([(key, cert)])
    probe = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        with _quiet_stderr():
            probe.add_secure_port("127.0.0.1:0", creds)
    except RuntimeError:
        raise TLSError(
            f"--tls-cert {cert_path} / --tls-key {key_path}: gRPC refused the pair "
            "(the key does not match the certificate, or a file is damaged)"
        ) from None
    finally:
        probe.stop(None)
    return creds


def channel_credentials(ca_path: str | None = None) -> grpc.ChannelCredentials:
    """Client credentials: trust the PEM CA bundle at `ca_path` (a self-signed server certificate
    works as its own CA), or the system's roots when None."""
    ca = read_pem(ca_path, "--tls-ca") if ca_path else None
    return grpc.ssl_channel_credentials(root_certificates=ca)
