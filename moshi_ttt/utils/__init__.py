"""The lowest layer: helpers with no moshi or torch in them, shared by every other layer: `io` (atomic file
writes) and `validate` (the config dataclasses' field checks and mapping → dataclass builder)."""
