"""The step channel: the leader's TCP connection to each follower (docs/deploy.md).

The leader sends each step's plan (program specs, the lanes' host inputs, which device tokens feed
which rows) to every follower before it dispatches the step itself; followers send a heartbeat
every `HEARTBEAT_S` seconds. A follower that closes its connection, or whose heartbeats stop for
`timeout` seconds, is reported lost (`on_lost`) at once, so the leader never waits on it blindly.

Frames: 8-byte big-endian length, then a message: a 4-byte header length, a JSON header whose numpy
arrays are replaced by `{"__nd__": i}`, then the arrays' raw bytes in order (dtype and shape in the
header). No pickle: a frame carries data, never code.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from crosspool_jax.errors import CrossPoolError

HEARTBEAT_S = 0.5
_LEN = struct.Struct(">Q")
_HDR = struct.Struct(">I")


class ChannelError(CrossPoolError, ConnectionError):
    """The step channel could not be set up, or a peer went away."""


# ---- message codec ------------------------------------------------------------------------------


def encode(msg: Any) -> bytes:
    """A JSON-able value whose leaves may be numpy arrays -> bytes (see module docstring)."""
    arrays: list[np.ndarray] = []

    def walk(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            arrays.append(np.ascontiguousarray(x))
            return {"__nd__": len(arrays) - 1, "dtype": x.dtype.str, "shape": list(x.shape)}
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v) for v in x]
        if isinstance(x, np.integer | np.floating | np.bool_):
            return x.item()
        return x

    header = json.dumps(walk(msg), separators=(",", ":")).encode()
    return b"".join([_HDR.pack(len(header)), header, *(a.tobytes() for a in arrays)])


def decode(data: bytes) -> Any:
    """Inverse of `encode` (the arrays are writable copies)."""
    (n,) = _HDR.unpack_from(data, 0)
    header = json.loads(data[_HDR.size:_HDR.size + n])
    offset = _HDR.size + n

    def walk(x: Any) -> Any:
        nonlocal offset
        if isinstance(x, dict) and "__nd__" in x:
            dt, shape = np.dtype(x["dtype"]), tuple(x["shape"])
            size = dt.itemsize * int(np.prod(shape, dtype=np.int64))
            a = np.frombuffer(data, dt, count=size // dt.itemsize if dt.itemsize else 0, offset=offset)
            offset += size
            return a.reshape(shape).copy()
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(header)  # arrays were appended depth-first in `encode`'s walk: same order here


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LEN.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ChannelError("the peer closed the connection")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return _recv_exact(sock, n)


# ---- leader side --------------------------------------------------------------------------------


class LeaderChannel:
    """The leader's connections to its followers (process ids 1..N-1).

    `open(host, port, followers, timeout)` binds and waits for every follower's hello. `send(msg)`
    writes one message to all; a failed write reports the follower lost and raises ChannelError.
    `on_lost(process_id, reason)` is called once, from a watcher thread or the sending thread, for
    the first follower lost (the group cannot run on without it)."""

    def __init__(self, socks: dict[int, socket.socket], timeout: float):
        self._socks = socks
        self.timeout = timeout
        self._send_lock = threading.Lock()
        self._lost_lock = threading.Lock()
        self.lost: tuple[int, str] | None = None  # (process id, reason) of the first follower lost
        self.on_lost: Callable[[int, str], None] | None = None
        self._closing = False
        self._watchers = [threading.Thread(target=self._watch, args=(pid, s), name=f"step-channel-watch{pid}",
                                           daemon=True) for pid, s in socks.items()]
        for t in self._watchers:
            t.start()

    @classmethod
    def open(cls, host: str, port: int, followers: int, timeout: float = 10.0,
             accept_timeout: float = 300.0) -> LeaderChannel:
        """Listens on host:port and waits up to `accept_timeout` s for `followers` followers."""
        srv = socket.create_server((host, port), reuse_port=False)
        srv.settimeout(1.0)
        socks: dict[int, socket.socket] = {}
        deadline = time.monotonic() + accept_timeout
        try:
            while len(socks) < followers:
                if time.monotonic() > deadline:
                    raise ChannelError(f"step channel {host}:{port}: {len(socks)} of {followers} followers "
                                       f"connected in {accept_timeout:.0f} s")
                try:
                    s, _ = srv.accept()
                except TimeoutError:
                    continue
                s.settimeout(accept_timeout)
                hello = decode(_recv_frame(s))
                pid = int(hello.get("process_id", -1))
                if not 1 <= pid <= followers or pid in socks:
                    s.close()
                    raise ChannelError(f"step channel: unexpected hello {hello}")
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                socks[pid] = s
        except BaseException:
            for s in socks.values():
                s.close()
            raise
        finally:
            srv.close()
        return cls(socks, timeout)

    def _report(self, pid: int, reason: str) -> None:
        with self._lost_lock:
            if self.lost is not None or self._closing:
                return
            self.lost = (pid, reason)
        with contextlib.suppress(OSError):  # a send blocked on the lost follower's full buffer fails
            self._socks[pid].shutdown(socket.SHUT_RDWR)
        if self.on_lost is not None:
            self.on_lost(pid, reason)

    def _watch(self, pid: int, s: socket.socket) -> None:
        """Reads the follower's heartbeats; EOF, an error or `timeout` s of silence: lost."""
        s.settimeout(self.timeout)
        try:
            while True:
                msg = decode(_recv_frame(s))
                if msg.get("op") == "error":  # the follower failed a step: it says why, then exits
                    self._report(pid, f"process {pid} failed: {msg.get('message')}")
                    return
        except TimeoutError:
            self._report(pid, f"process {pid} sent no heartbeat for {self.timeout:.1f} s")
        except (OSError, ChannelError, ValueError) as e:
            self._report(pid, f"process {pid} closed the step channel ({type(e).__name__}: {e})")

    def send(self, msg: Any) -> None:
        """Sends `msg` to every follower (in process order)."""
        payload = encode(msg)
        with self._send_lock:
            if self.lost is not None:
                raise ChannelError(self.lost[1])
            for pid, s in sorted(self._socks.items()):
                try:
                    _send_frame(s, payload)
                except OSError as e:
                    self._report(pid, f"process {pid}: sending the step failed ({e})")
                    raise ChannelError(f"process {pid}: sending the step failed ({e})") from None

    def close(self, stop_followers: bool = True, wait_s: float = 30.0) -> None:
        """Tells the followers to stop (when still connected) and waits up to `wait_s` for each
        to close its end (a follower leaves jax.distributed first: the leader's process hosts its
        coordination service, which must outlive them), then closes the connections."""
        with self._lost_lock:
            self._closing = True
        if stop_followers and self.lost is None:
            with contextlib.suppress(ChannelError):
                self.send({"op": "stop"})
                deadline = time.monotonic() + wait_s
                for t in self._watchers:
                    t.join(max(0.0, deadline - time.monotonic()))
        for s in self._socks.values():
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


# ---- follower side ------------------------------------------------------------------------------


class FollowerChannel:
    """A follower's connection to the leader: `recv()` the next message; heartbeats in a thread."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="step-channel-heartbeat", daemon=True).start()

    @classmethod
    def connect(cls, host: str, port: int, process_id: int, timeout: float = 300.0) -> FollowerChannel:
        """Connects to the leader at host:port (retrying until `timeout` s) and says hello."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                s = socket.create_connection((host, port), timeout=5.0)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise ChannelError(f"step channel: cannot reach the leader at {host}:{port}: "
                                       f"{e}") from None
                time.sleep(0.2)
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _send_frame(s, encode({"op": "hello", "process_id": process_id}))
        return cls(s)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.send({"op": "heartbeat"})
            except OSError:
                return

    def send(self, msg: Any) -> None:
        with self._send_lock:
            _send_frame(self._sock, encode(msg))

    def recv(self) -> Any:
        """The leader's next message (blocks); ChannelError when the leader went away."""
        try:
            return decode(_recv_frame(self._sock))
        except OSError as e:
            raise ChannelError(f"the leader closed the step channel ({e})") from None

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
