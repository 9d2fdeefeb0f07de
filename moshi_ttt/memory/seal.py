"""Sealing one conversation memory for its client: the `Token` and AES-256-GCM.

A `Token` is `<id>.<key>`: a random 128-bit id (hex) and a random 256-bit key (base64url), issued to the
client and never written. A sealed memory is `MAGIC`, a u32 length, a JSON header (id, fingerprint, format
version, sizes, times, a key check) and the memory file's bytes sealed with AES-256-GCM in segments (16 MiB by
default) (nonce = 8 random bytes + the u32 segment index; associated data = `associated_data(...)` +
header + index + last flag, so segments cannot be reordered, cut or moved to another id, model or format).
Every way a token can fail (malformed, wrong key, tampered, another model) raises the same
`MemoryUnavailable`; its `cause` (for the server log only) says which.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import os
import re
import struct
import typing as tp

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from moshi_ttt.memory.header import FORMAT_VERSION

MAGIC = b"MTTMEM1\n"
SEGMENT = 1 << 24  # 16 MiB of plaintext per GCM segment (one GCM call is limited to < 2**31 bytes)
TAG = 16
HEADER_CAP = 1 << 16  # bytes: a stored header (magic, length, JSON of fixed small fields) is far below this
_ID = re.compile(r"[0-9a-f]{32}")


def is_memory_id(text: str) -> bool:
    """`text` is a memory id: 32 lowercase hex digits."""
    return _ID.fullmatch(text) is not None


class MemoryUnavailable(Exception):
    """The one refusal for a token that does not open a memory; `cause` is for logs and `label` (few values,
    e.g. "tampered") for metrics, never for clients."""

    def __init__(self, cause: str, label: str):
        super().__init__("memory not available")
        self.cause, self.label = cause, label


@dataclasses.dataclass(frozen=True)
class Token:
    id: str
    key: bytes

    @classmethod
    def new(cls, memory_id: str | None = None) -> Token:
        """A fresh 256-bit key, for a new id or (a resumed conversation) for `memory_id`."""
        return cls(memory_id or os.urandom(16).hex(), AESGCM.generate_key(bit_length=256))

    @classmethod
    def parse(cls, text: str) -> Token:
        mid, _, k = str(text).partition(".")
        try:
            key = base64.urlsafe_b64decode(k + "=" * (-len(k) % 4))
        except (binascii.Error, ValueError):
            key = b""
        if not _ID.fullmatch(mid) or len(key) != 32 or _b64(key) != k:  # one spelling per key
            raise MemoryUnavailable(f"malformed token ({len(text)} characters)", "malformed_token")
        return cls(mid, key)

    def __str__(self) -> str:
        return f"{self.id}.{_b64(self.key)}"

    def __repr__(self) -> str:  # never the key
        return f"Token(id={self.id!r})"


def _b64(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).rstrip(b"=").decode()


def associated_data(memory_id: str, fp: str) -> bytes:
    return f"moshi-ttt-memory|{FORMAT_VERSION}|{memory_id}|{fp}".encode()


def _check(key: bytes, memory_id: str) -> str:
    return hmac.new(key, b"moshi-ttt-memory-check|" + memory_id.encode(), hashlib.sha256).hexdigest()


def key_matches(token: Token, head: tp.Mapping[str, tp.Any]) -> bool:
    """The key of `token` is the key the memory whose stored header is `head` was sealed with (constant time)."""
    return hmac.compare_digest(str(head.get("check", "")), _check(token.key, token.id))


def seal(token: Token, fp: str, data: bytes, meta: tp.Mapping[str, tp.Any], segment: int = SEGMENT) -> list[bytes]:
    """The stored bytes of `data` (a memory file), as parts to write in order."""
    nonce = os.urandom(8)
    n = max(1, -(-len(data) // segment))
    head = json.dumps(dict(meta, id=token.id, fingerprint=fp, version=FORMAT_VERSION, plain_bytes=len(data),
                           segment=segment, segments=n, nonce=nonce.hex(), check=_check(token.key, token.id)),
                      sort_keys=True).encode()
    ad = associated_data(token.id, fp) + b"|" + head
    aes = AESGCM(token.key)
    parts = [MAGIC, struct.pack("<I", len(head)), head]
    for i in range(n):
        seg = data[i * segment:(i + 1) * segment]
        parts.append(aes.encrypt(nonce + struct.pack("<I", i), seg, ad + struct.pack("<I?", i, i == n - 1)))
    return parts


def header_length(blob: bytes | memoryview) -> int:
    """Bytes from the start of a stored memory to the end of its header (as its length field says; 0 if
    `blob` is too short to say)."""
    if len(blob) < len(MAGIC) + 4:
        return 0
    return len(MAGIC) + 4 + struct.unpack("<I", blob[len(MAGIC):len(MAGIC) + 4])[0]


def read_header(blob: bytes | memoryview, cap: int = HEADER_CAP) -> tuple[dict, int]:
    """(header, offset of the first segment) of the first bytes of a stored memory (`cap` at most: a longer
    declared header is refused unread); ValueError for a file that is not a stored memory."""
    if bytes(blob[:len(MAGIC)]) != MAGIC:
        raise ValueError("no memory-store magic")
    (n,) = struct.unpack("<I", blob[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if start + n > cap:
        raise ValueError(f"header of {n} bytes, over the cap of {cap - start}")
    if len(blob) < start + n:
        raise ValueError(f"header of {n} bytes, only {len(blob) - start} present")
    head = json.loads(bytes(blob[start:start + n]))
    if not isinstance(head, dict):
        raise ValueError(f"header is a JSON {type(head).__name__}, not an object")
    return head, start + n


def unseal(token: Token, fp: str, blob: bytes) -> bytes:
    """The memory file inside `blob`; `MemoryUnavailable` for any failure."""
    blob = memoryview(blob)  # segments are decrypted from slices of it, never copies
    try:
        head, off = read_header(blob)
    except (ValueError, struct.error) as e:
        raise MemoryUnavailable(f"tampered: unreadable header ({e})", "tampered") from None
    if not key_matches(token, head):
        raise MemoryUnavailable("wrong key", "wrong_key")
    if head.get("fingerprint") != fp:
        raise MemoryUnavailable(f"another model (fingerprint {str(head.get('fingerprint'))[:16]}…)", "another_model")
    ad = associated_data(token.id, fp) + b"|" + bytes(blob[len(MAGIC) + 4:off])
    aes, out = AESGCM(token.key), []
    try:
        nonce, n, size = bytes.fromhex(head["nonce"]), int(head["segments"]), int(head["plain_bytes"])
        step = int(head["segment"])
        for i in range(n):
            seg = min(step, size - i * step) + TAG
            out.append(aes.decrypt(nonce + struct.pack("<I", i), blob[off:off + seg],
                                   ad + struct.pack("<I?", i, i == n - 1)))
            off += seg
    except (InvalidTag, KeyError, ValueError, TypeError) as e:
        raise MemoryUnavailable(f"tampered: {type(e).__name__}", "tampered") from None
    if off != len(blob):
        raise MemoryUnavailable("tampered: trailing bytes", "tampered")
    return b"".join(out)

