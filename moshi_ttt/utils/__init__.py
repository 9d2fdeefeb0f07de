"""The lowest layer: helpers with no moshi in them, shared by every other layer: `io` (atomic file writes),
`validate` (the config dataclasses' field checks and mapping → dataclass builder), `logs` (log lines on stderr),
`cache` (moshi_ttt's cache folder) and `device` (the device and dtype policy: the one of them that imports torch)."""
