"""Where a `MemoryStore` keeps its bytes: a local directory (`LocalBackend`) or an S3-compatible bucket
(`S3Backend`, through `obstore`). `backend(spec)` picks one from a store spec (`DIR` or `s3://bucket/prefix`).

A backend holds named objects (`<id>.mem`) whole, addressed by `locate(name)` (a `Path`, an object key):
`put(loc, parts, now)` writes all of `parts` atomically (a reader sees the previous object or the whole new
one, never a part) and records `now` as its last use; `get`; `head(loc, n)` (the first n bytes); `touch(loc,
now)` (a new last use); `delete(loc)` (True if it existed); `list(suffix)` (a `Stat` per object named
`*suffix`); `sweep(suffix, now, age)` (leftovers of killed writers older than `age` seconds). A missing object
raises `FileNotFoundError`.
"""

from __future__ import annotations

import dataclasses
import os
import typing as tp
from pathlib import Path

from moshi_ttt.utils.io import atomic_write

S3_EXTRA = "pip install 'moshi-ttt[s3]'"
USED = ".used/"  # S3 last-use markers: `<name>.used/<µs>`


@dataclasses.dataclass(frozen=True)
class Stat:
    """name: the object's name; size: bytes; used: last save or use (Unix seconds); saved: last save when the
    listing knows it (S3: the object's modification time), None when only the object's header does."""

    name: str
    size: int
    used: float
    saved: float | None = None


class Backend(tp.Protocol):
    where: str

    def locate(self, name: str) -> tp.Any: ...
    def put(self, loc: tp.Any, parts: tp.Sequence[bytes], now: float) -> None: ...
    def get(self, loc: tp.Any) -> bytes: ...
    def head(self, loc: tp.Any, n: int) -> bytes: ...
    def touch(self, loc: tp.Any, now: float) -> None: ...
    def delete(self, loc: tp.Any) -> bool: ...
    def list(self, suffix: str) -> list[Stat]: ...
    def sweep(self, suffix: str, now: float, age: float) -> None: ...


class LocalBackend:
    """Files in `root` (a shared folder works for several instances: NFS and the like); atomic by a temporary
    sibling renamed onto the target (`utils.io.atomic_write`, fsync'd); last use = the file's mtime."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.where = str(self.root)

    def locate(self, name: str) -> Path:
        return self.root / name

    def put(self, loc: Path, parts: tp.Sequence[bytes], now: float) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                for p in parts:
                    f.write(p)
                f.flush()
                os.fsync(f.fileno())
            os.utime(tmp, (now, now))
        atomic_write(loc, write)

    def get(self, loc: Path) -> bytes:
        return loc.read_bytes()

    def head(self, loc: Path, n: int) -> bytes:
        with open(loc, "rb") as f:
            return f.read(n)

    def touch(self, loc: Path, now: float) -> None:
        os.utime(loc, (now, now))

    def delete(self, loc: Path) -> bool:
        try:
            loc.unlink()
        except FileNotFoundError:
            return False
        return True

    def list(self, suffix: str) -> list[Stat]:
        out = []
        for p in sorted(self.root.glob(f"*{suffix}")):
            try:
                st = p.stat()
            except OSError:
                continue
            out.append(Stat(p.name, st.st_size, st.st_mtime))
        return out

    def sweep(self, suffix: str, now: float, age: float) -> None:
        for tmp in self.root.glob(f"*{suffix}.*.tmp"):  # `atomic_write`'s temporaries
            try:
                if now - tmp.stat().st_mtime > age:
                    tmp.unlink()
            except OSError:
                pass


class S3Backend:
    """Objects under `s3://bucket/prefix`. A put is one S3 PUT (multipart above `MULTIPART` bytes: the object
    appears only when the upload completes), so a killed writer leaves the previous object, never a torn one.
    Last use (the store's clock, as in a local directory): an empty marker object `<name>.used/<µs>` written by
    each save and load; `list` reads every time from one listing, `sweep` drops the superseded markers.
    Credentials, region and endpoint: the standard AWS environment variables (`AWS_ACCESS_KEY_ID`,
    `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`; `AWS_ALLOW_HTTP=true`
    for a plain-http endpoint), read by obstore."""

    MULTIPART = 5 << 20

    def __init__(self, url: str):
        try:
            import obstore
            from obstore.store import S3Store
        except ImportError:
            raise ImportError(f"memory store {url!r}: an s3:// store needs obstore ({S3_EXTRA})") from None
        self.obs, self.where = obstore, url.rstrip("/")
        try:
            self.store = S3Store.from_url(self.where)
            next(iter(obstore.list(self.store, chunk_size=1)), None)  # fail now, not at the first save
        except Exception as e:  # obstore raises its own types (configuration, credentials, no such bucket)
            raise ValueError(f"memory store {url!r}: cannot list the bucket ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]})") from None

    def locate(self, name: str) -> str:
        return name

    def put(self, loc: str, parts: tp.Sequence[bytes], now: float) -> None:
        size = sum(len(p) for p in parts)
        self.obs.put(self.store, loc, b"".join(parts) if size <= self.MULTIPART else list(parts),
                     chunk_size=self.MULTIPART)
        self.touch(loc, now)

    def get(self, loc: str) -> bytes:
        return bytes(self.obs.get(self.store, loc).bytes())

    def head(self, loc: str, n: int) -> bytes:
        return bytes(self.obs.get_range(self.store, loc, start=0, length=n))

    def touch(self, loc: str, now: float) -> None:
        self.obs.put(self.store, f"{loc}{USED}{round(now * 1e6)}", b"")

    def _keys(self, prefix: str | None = None) -> list[dict]:
        return [o for page in self.obs.list(self.store, prefix) for o in page]

    def delete(self, loc: str) -> bool:
        try:
            self.obs.head(self.store, loc)
            existed = True
        except FileNotFoundError:
            existed = False
        self.obs.delete(self.store, [loc, *(o["path"] for o in self._keys(loc + USED.rstrip("/")))])
        return existed

    def _scan(self, suffix: str) -> tuple[dict[str, dict], dict[str, list[tuple[float, str]]]]:
        objs, used = {}, {}
        for o in self._keys():
            name = o["path"]
            if name.endswith(suffix) and "/" not in name:
                objs[name] = o
            elif USED in name:
                base, _, t = name.rpartition(USED)
                if base.endswith(suffix) and t.isdigit():
                    used.setdefault(base, []).append((int(t) / 1e6, name))
        return objs, used

    def list(self, suffix: str) -> list[Stat]:
        objs, used = self._scan(suffix)
        return [Stat(n, int(o["size"]), max(used[n])[0] if n in used else o["last_modified"].timestamp(),
                     saved=o["last_modified"].timestamp()) for n, o in sorted(objs.items())]

    def sweep(self, suffix: str, now: float, age: float) -> None:
        """Drops the markers superseded by a newer one, or whose memory is gone (an unfinished S3 upload is no
        object: nothing else to collect; a bucket lifecycle rule aborts them)."""
        objs, used = self._scan(suffix)
        stale = [k for n, ms in used.items() for _, k in sorted(ms)[:-1 if n in objs else None]]
        for i in range(0, len(stale), 1000):
            self.obs.delete(self.store, stale[i:i + 1000])


def backend(spec: str | Path) -> Backend:
    """`s3://bucket/prefix` → `S3Backend`; anything else is a local directory."""
    text = str(spec)
    if text.startswith("s3://"):
        if len(text) <= len("s3://") or text[5] == "/":
            raise ValueError(f"memory store {text!r}: expected s3://bucket/prefix")
        return S3Backend(text)
    if "://" in text:
        raise ValueError(f"memory store {text!r}: only a directory or s3://bucket/prefix is supported")
    return LocalBackend(text)
