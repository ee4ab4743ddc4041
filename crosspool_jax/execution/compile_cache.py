"""JAX's persistent compilation cache, on by default for the engine.

A step program compiled once is written to a cache directory and read back by every later process
(a restarted server, the bench's per-mode processes, every device group of one engine that needs
the same program), so a program costs its compile once per machine instead of once per process.

`enable_compilation_cache()` is called by every `GroupRunner` (idempotent, cheap). Where the cache
goes, first match wins:

1. JAX's own setting, when something set it already (`JAX_COMPILATION_CACHE_DIR`, or
   `jax.config.update("jax_compilation_cache_dir", ...)`, e.g. `crosspool bench --compile-cache`):
   kept as it is;
2. the `path` argument;
3. `$CROSSPOOL_COMPILATION_CACHE` (a directory; ``off`` / ``none`` / ``0`` / ``false``: no cache);
4. ``$XDG_CACHE_HOME/crosspool/jax`` (default ``~/.cache/crosspool/jax``).

When it sets the directory it also lowers JAX's threshold for what is worth caching to programs
that took at least `MIN_COMPILE_SECS` to compile (JAX's default is 1 s; a CPU step program of a
small model compiles in about 0.5-2 s), unless ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` is
set, and caches entries of any size.

The cache is trusted code (JAX executes what it reads): keep it in a directory only you can write.

XLA's kernel cache, one file per compiling thread (`kernel_cache_for_this_thread`). XLA:GPU can
keep the kernels it compiled in a file (``xla_gpu_kernel_cache_file``) and reuse them in later
compiles of other programs, which repeat most of their kernels (the grid's step programs carry
63 distinct Triton kernels among 352). JAX's own switch for it
(``JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES=all``) points every process at one file, which XLA
rewrites whole after each compile without a lock, so compile processes that share it can fail a
compile. Here each thread that compiles step programs on a GPU (a compile worker process's one,
each compile thread of the serving process) claims a file of its own under
``<cache dir>/xla_kernel_caches/`` (an exclusive `fcntl.flock` held for the thread's life, so no
two compiles at once, in one process or several, write one file) and compiles with it as a
per-call compiler option (`KERNEL_CACHE_OPTION`, `compile_with_kernel_cache`), which
`exclude_kernel_cache_from_key` keeps out of JAX's persistent-cache key: the file does not change
the executable, so a program keeps one key whichever thread or process compiled it. On by
default on GPU; ``$CROSSPOOL_XLA_KERNEL_CACHE=off`` turns it off.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import weakref
from typing import Any

ENV = "CROSSPOOL_COMPILATION_CACHE"
OFF = ("off", "none", "0", "false", "no")  # words that turn a setting off (case-insensitive)
ON = ("on", "1", "true", "yes")  # words that turn an on/off setting on
MIN_COMPILE_SECS = 0.5
KERNEL_CACHE_ENV = "CROSSPOOL_XLA_KERNEL_CACHE"  # on / off (module doc); default on
KERNEL_CACHE_OPTION = "xla_gpu_kernel_cache_file"  # the XLA debug option, set per compile
KERNEL_CACHE_DIR = "xla_kernel_caches"  # under the compilation cache directory
KERNEL_CACHE_SLOTS = 64  # most compile processes with a kernel cache file at once, per directory
KERNEL_CACHE_MAX_BYTES = 512 << 20  # a claimed file larger than this starts afresh (XLA reads it
# whole at every compile)

_log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/crosspool/jax`` (``~/.cache/crosspool/jax`` when XDG_CACHE_HOME is unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "crosspool", "jax")


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns JAX's persistent compilation cache on (module docstring: which directory); returns
    the directory in use, or None when the cache is off. Idempotent: once a directory is set (by
    this or by anything else), later calls keep it."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if path is None:
        env = os.environ.get(ENV, "").strip()
        if env.lower() in OFF:
            return None
        path = env or default_cache_dir()
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:  # a read-only home: run without the cache rather than fail
        _log.warning("compilation cache off: cannot create %s (%s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def compilation_cache_dir() -> str | None:
    """The persistent cache directory JAX uses now (None: off)."""
    import jax

    return jax.config.jax_compilation_cache_dir or None


def kernel_cache_wanted() -> bool:
    """``$CROSSPOOL_XLA_KERNEL_CACHE`` read as on / off (unset or empty: on); ValueError for any
    other word."""
    text = os.environ.get(KERNEL_CACHE_ENV, "").strip().lower()
    if text and text not in ON + OFF:
        raise ValueError(f"${KERNEL_CACHE_ENV} must be on or off, got {text!r}")
    return text not in OFF


def exclude_kernel_cache_from_key() -> bool:
    """Keeps `KERNEL_CACHE_OPTION`, given as a per-call compiler option, out of JAX's persistent
    compilation cache key (as JAX keeps its autotune cache directory out). Returns False where
    this JAX has no such list (then the kernel cache must stay off: each file would key its own
    copies of every program)."""
    try:
        from jax._src import cache_key
    except ImportError:  # pragma: no cover - a JAX without the module
        return False
    excluded = getattr(cache_key, "env_override_flags_to_exclude_from_cache_key", None)
    if not isinstance(excluded, set):
        return False
    excluded.add(KERNEL_CACHE_OPTION)
    return True


class KernelCacheClaim:
    """One claimed kernel cache file: `path`, locked until `release()` (or until this object is
    garbage collected, e.g. with the thread that held it, or the process exits)."""

    def __init__(self, path: str, lock_fd: int):
        self.path = path
        # closing the descriptor drops its flock; the finalizer closes it exactly once
        self._close = weakref.finalize(self, os.close, lock_fd)

    def discard(self) -> None:
        """Deletes the file (e.g. after a compile that failed with it: it may be truncated); the
        next compile writes a new one."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)

    def release(self) -> None:
        self._close()


def claim_kernel_cache(cache_dir: str) -> KernelCacheClaim | None:
    """The first free kernel cache file slot ``<cache_dir>/xla_kernel_caches/slot-<k>.bin`` (k <
    `KERNEL_CACHE_SLOTS`), held by a non-blocking exclusive flock on ``slot-<k>.lock``; None when
    every slot is held or the directory cannot be written. The file keeps the kernels of earlier
    processes that held the slot, unless it grew past `KERNEL_CACHE_MAX_BYTES` (then it is
    deleted)."""
    root = os.path.join(cache_dir, KERNEL_CACHE_DIR)
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
    except OSError as e:
        _log.warning("XLA kernel cache off: cannot create %s (%s)", root, e)
        return None
    for k in range(KERNEL_CACHE_SLOTS):
        try:
            fd = os.open(os.path.join(root, f"slot-{k}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            _log.warning("XLA kernel cache off: cannot open a lock in %s (%s)", root, e)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by another live process (or another claim of this one)
            os.close(fd)
            continue
        claim = KernelCacheClaim(os.path.join(root, f"slot-{k}.bin"), fd)
        with contextlib.suppress(FileNotFoundError):
            if os.path.getsize(claim.path) > KERNEL_CACHE_MAX_BYTES:
                claim.discard()
        return claim
    _log.warning("XLA kernel cache off: all %d slots in %s are held", KERNEL_CACHE_SLOTS, root)
    return None


_thread_claims = threading.local()  # .claim: this thread's KernelCacheClaim or None, once tried


def kernel_cache_for_this_thread() -> KernelCacheClaim | None:
    """The XLA kernel cache file of the calling thread, claimed on its first call and held until
    the thread ends: one file per compiling thread, since XLA compiles on the calling thread and
    rewrites the file after each compile without a lock (a compile worker process compiles on
    one thread; a process that compiles on several threads holds one slot per thread). None: off
    on CPU, without a compilation cache directory, with ``$CROSSPOOL_XLA_KERNEL_CACHE=off``, where
    JAX's own kernel cache setting is on (``JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES``: its file
    wins), where the option cannot be kept out of the persistent cache's key, or with every slot
    held."""
    import jax

    if hasattr(_thread_claims, "claim"):
        return _thread_claims.claim
    claim = None
    cache_dir = compilation_cache_dir()
    jax_caches = jax.config.jax_persistent_cache_enable_xla_caches or ""
    if (cache_dir and jax.default_backend() != "cpu" and kernel_cache_wanted()
            and jax_caches != "all" and KERNEL_CACHE_OPTION not in jax_caches
            and exclude_kernel_cache_from_key()):
        claim = claim_kernel_cache(cache_dir)
    _thread_claims.claim = claim
    return claim


def compile_with_kernel_cache(lowered: Any, compiler_options: dict[str, Any] | None,
                              claim: KernelCacheClaim | None) -> Any:
    """``lowered.compile`` with `compiler_options`, plus `claim`'s kernel cache file when there is
    one. A compile with the file that fails naming a cache in its message is retried without
    it, and the file deleted (a process killed while XLA rewrote it leaves it cut short)."""
    options = dict(compiler_options or {})
    if claim is not None:
        try:
            return lowered.compile(compiler_options=options | {KERNEL_CACHE_OPTION: claim.path})
        except Exception as e:
            if "cache" not in str(e).lower():
                raise
            _log.warning("compiling without the XLA kernel cache %s, which is deleted: %s",
                         claim.path, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            claim.discard()
    return lowered.compile(compiler_options=options or None)
