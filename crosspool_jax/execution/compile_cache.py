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
"""

from __future__ import annotations

import logging
import os

ENV = "CROSSPOOL_COMPILATION_CACHE"
OFF = ("off", "none", "0", "false", "no")  # words that turn a setting off (case-insensitive)
ON = ("on", "1", "true", "yes")  # words that turn an on/off setting on
MIN_COMPILE_SECS = 0.5

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
