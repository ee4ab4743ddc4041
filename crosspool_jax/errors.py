"""The engine's exception types. Each message is one line that names the problem and its source."""


class CrossPoolError(Exception):
    """Base of every error the engine raises on purpose (bad input, bad checkpoint, capacity)."""


class CheckpointError(CrossPoolError):
    """A checkpoint that cannot be loaded: missing/extra/mis-shaped tensors, truncated files, bad dtype."""


class InvalidRequestError(CrossPoolError, ValueError):
    """A request the engine refuses: empty or too-long prompt, ids out of vocabulary, bad sampling params."""


class CapacityError(CrossPoolError):
    """A load or request that does not fit the memory it was given."""


class UnavailableError(CrossPoolError):
    """The engine cannot serve now (e.g. a multi-host group lost a process); the server answers
    UNAVAILABLE with the message."""
