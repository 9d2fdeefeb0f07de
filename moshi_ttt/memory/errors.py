"""The memory store's failures (`store` re-exports them): every backend failure is a `StoreError` (an `OSError`,
so that a conversation goes on: a failed save is logged and counted, never an internal error), with a
`label` for the failures metric."""

from __future__ import annotations


class StoreError(OSError):
    """A backend failure (disk, S3); the message names the store and the operation."""

    label = "store"

    def __init__(self, message: str):
        super().__init__(message)


class StoreFull(StoreError):
    """A new memory refused: the store is at its bound (nobody is evicted to make room)."""

    label = "store_full"


class QuotaExceeded(StoreError):
    """A new memory, or more bytes, over its owner's quota (memories, bytes)."""

    label = "quota"


class StaleWrite(StoreError):
    """The stored version is not the one the writer expected, or the id is deleted (tombstoned)."""

    label = "stale"


class Conflict(Exception):
    """A backend's conditional write or read found another version than the one asked for (the store turns it
    into `StaleWrite` or a refusal)."""
