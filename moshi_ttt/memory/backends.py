"""Where a `MemoryStore` keeps its bytes: a local directory (`LocalBackend`) or an S3-compatible bucket
(`S3Backend`, through `obstore`). `backend(spec)` picks one from a store spec (`DIR` or `s3://bucket/prefix`).

A backend holds named objects whole (`name` may have one folder level: `owners/<o>/<id>.<bytes>`), addressed
by `locate(name)`, each with a `version` (an opaque string that changes with every put):
* `head(loc, n)` → (its first n bytes, version, size); `get(loc, version)` → the whole object if it is still
  that version (else `Conflict`);
* `put(loc, parts, now, expect)` writes all of `parts` atomically (a reader sees the previous object or the
  whole new one) if the object is `expect` (None: absent; `ANY`: whatever) (else `Conflict`), records `now`
  as its save time and returns the new version;
* `delete(loc, version=None)` (True if it existed; with `version`, only that version);
* `list(folder, suffix)` (a `Stat` per object `folder*suffix`, one level); `sweep(now, age)` (leftovers of
  killed writers older than `age` seconds); `lock(name)` (a context serialising the writers of `name`
  across processes where the backend needs one).
A missing object raises `FileNotFoundError`; every other failure `errors.StoreError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import stat as stat_
import threading
import typing as tp
from pathlib import Path

from moshi_ttt.memory.errors import Conflict, StoreError
from moshi_ttt.utils.io import TMP_SUFFIX, atomic_write_parts

S3_EXTRA = "pip install 'moshi-ttt[s3]'"
ANY = "*"  # `put`'s expect: overwrite whatever is there
LEGACY_USED = ".used/"  # last-use markers `<name>.used/<µs>` of older stores (no LRU any more): swept
LOCKS = ".locks"


@dataclasses.dataclass(frozen=True)
class Stat:
    """name: the object's name (relative to the store's root); size: bytes; saved: its last put (Unix
    seconds: a local file's mtime, from the store's clock; an S3 object's modification time); version."""

    name: str
    size: int
    saved: float
    version: str


class Backend(tp.Protocol):
    where: str

    def locate(self, name: str) -> tp.Any: ...
    def head(self, loc: tp.Any, n: int) -> tuple[bytes, str, int]: ...
    def get(self, loc: tp.Any, version: str) -> bytes: ...
    def put(self, loc: tp.Any, parts: tp.Sequence[bytes], now: float, expect: str | None) -> str: ...
    def delete(self, loc: tp.Any, version: str | None = None) -> bool: ...
    def list(self, folder: str = "", suffix: str = "") -> list[Stat]: ...
    def sweep(self, now: float, age: float) -> None: ...
    def lock(self, name: str) -> tp.ContextManager[None]: ...


def _version(st: os.stat_result) -> str:
    """A local file's version: a new file (inode) per put; the ctime of its rename tells reused inodes apart."""
    return f"{st.st_ino:x}.{st.st_ctime_ns:x}.{st.st_size:x}"


class LocalBackend:
    """Files in `root` (a folder shared by several instances works: NFS and the like), files 0600 and folders
    0700. A put writes an unpredictable temporary sibling (O_EXCL | O_NOFOLLOW), fsyncs it and renames it
    onto the target, then fsyncs the folder (`utils.io.atomic_write_parts`); its mtime is the save time.
    Conditional puts and deletes hold `lock(name)`: an exclusive `flock` on `.locks/<name>`, across
    processes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"memory store {str(root)!r}: cannot create the directory ({e.strerror or e})") from e
        self.where = str(self.root)
        self._held = threading.local()

    def _fail(self, what: str, e: OSError) -> StoreError:
        return StoreError(f"memory store {self.where}: {what} failed ({e.strerror or e})")

    def locate(self, name: str) -> Path:
        return self.root / name

    def head(self, loc: Path, n: int) -> tuple[bytes, str, int]:
        try:
            with open(loc, "rb", opener=_nofollow) as f:
                st = os.fstat(f.fileno())
                return f.read(n), _version(st), st.st_size
        except FileNotFoundError:
            raise
        except OSError as e:
            raise self._fail(f"reading {loc.name}", e) from e

    def get(self, loc: Path, version: str) -> bytes:
        try:
            with open(loc, "rb", opener=_nofollow) as f:  # an open file keeps its content across a rename
                if _version(os.fstat(f.fileno())) != version:
                    raise Conflict(f"{loc.name} changed")
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise self._fail(f"reading {loc.name}", e) from e

    def _current(self, loc: Path) -> str | None:
        try:
            return _version(os.stat(loc, follow_symlinks=False))
        except FileNotFoundError:
            return None

    def put(self, loc: Path, parts: tp.Sequence[bytes], now: float, expect: str | None) -> str:
        try:
            with self._lock_if(expect != ANY, loc):
                if expect != ANY and self._current(loc) != expect:
                    raise Conflict(f"{loc.name} is not the version expected")
                for folder in reversed(loc.relative_to(self.root).parents[:-1]):
                    (self.root / folder).mkdir(mode=0o700, exist_ok=True)
                return _version(atomic_write_parts(loc, parts, mode=0o600, mtime=now))
        except OSError as e:
            raise self._fail(f"writing {loc.name}", e) from e

    def delete(self, loc: Path, version: str | None = None) -> bool:
        try:
            with self._lock_if(version is not None, loc):
                current = self._current(loc)
                if current is None or (version is not None and current != version):
                    return False
                loc.unlink()
                return True
        except OSError as e:
            raise self._fail(f"deleting {loc.name}", e) from e

    def list(self, folder: str = "", suffix: str = "") -> list[Stat]:
        out = []
        try:
            entries = sorted(os.scandir(self.root / folder), key=lambda d: d.name)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise self._fail(f"listing {folder or '.'}", e) from e
        for d in entries:
            if not d.name.endswith(suffix) or d.name.endswith(TMP_SUFFIX) or d.name.startswith("."):
                continue
            try:
                st = d.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat_.S_ISREG(st.st_mode):
                out.append(Stat(f"{folder}{d.name}", st.st_size, st.st_mtime, _version(st)))
        return out

    def folders(self, folder: str) -> list[str]:
        """The sub-folders of `folder` (names ending in "/", relative to the root)."""
        try:
            return sorted(f"{folder}{d.name}/" for d in os.scandir(self.root / folder)
                          if d.is_dir(follow_symlinks=False) and not d.name.startswith("."))
        except FileNotFoundError:
            return []

    def sweep(self, now: float, age: float) -> None:
        """Temporaries of killed writers (`utils.io.temporary`'s names), anywhere in the store, and the lock
        files of objects that are gone, both older than `age` seconds."""
        for tmp in self.root.rglob(f"*{TMP_SUFFIX}"):
            try:
                if now - tmp.lstat().st_mtime > age:
                    tmp.unlink()
            except OSError:
                pass
        for lock in self.root.joinpath(LOCKS).glob("*"):
            name = lock.name.replace("%", "/")
            try:
                if now - lock.lstat().st_mtime > age and not (self.root / name).exists():
                    with self.lock(name):
                        if not (self.root / name).exists():
                            lock.unlink(missing_ok=True)
            except OSError:
                pass

    def _lock_if(self, cond: bool, loc: Path) -> tp.ContextManager[None]:
        return self.lock(loc.relative_to(self.root).as_posix()) if cond else contextlib.nullcontext()

    @contextlib.contextmanager
    def lock(self, name: str) -> tp.Iterator[None]:
        """An exclusive flock on `.locks/<name>` (folders flattened), re-entrant within a thread; retried if
        the lock file was removed while waiting for it (`sweep`)."""
        held = self._held.__dict__.setdefault("names", set())
        if name in held:
            yield
            return
        path = self.root / LOCKS / name.replace("/", "%")
        path.parent.mkdir(mode=0o700, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    held.add(name)
                    try:
                        yield
                    finally:
                        held.discard(name)
                        os.close(fd)
                        fd = -1
                    return
            finally:
                if fd >= 0:
                    os.close(fd)


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


class S3Backend:
    """Objects under `s3://bucket/prefix`. A put is one S3 PUT (atomic: a killed writer leaves the previous
    object); conditional: `If-None-Match: *` to create, `If-Match: <ETag>` to replace (S3 and moto answer
    412). The version is the ETag; a read of the body is a GET with `If-Match`; a header read is a ranged GET.
    Every obstore failure other than a missing object becomes a `StoreError` naming the operation.
    Credentials, region and endpoint: the standard AWS environment variables (`AWS_ACCESS_KEY_ID`,
    `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`; `AWS_ALLOW_HTTP=true`
    for a plain-http endpoint), read by obstore."""

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

    def _call(self, what: str, fn: tp.Callable[..., tp.Any], *args, missing: bool = False, **kwargs) -> tp.Any:
        """`fn(*args, **kwargs)`; a missing object stays `FileNotFoundError` where `missing` (a read: the
        object may be absent; elsewhere it is a missing bucket), a failed precondition is `Conflict`,
        anything else obstore raises is a `StoreError`."""
        exc = self.obs.exceptions
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as e:
            if missing:
                raise
            raise StoreError(f"memory store {self.where}: {what} failed (not found: {str(e).splitlines()[0][:200]})"
                             ) from None
        except (exc.PreconditionError, exc.AlreadyExistsError) as e:
            raise Conflict(f"{what}: {type(e).__name__}") from None
        except (exc.BaseError, OSError) as e:
            first = (str(e).splitlines() or [""])[0][:300]
            raise StoreError(f"memory store {self.where}: {what} failed ({type(e).__name__}: {first})") from None

    def locate(self, name: str) -> str:
        return name

    def head(self, loc: str, n: int) -> tuple[bytes, str, int]:
        def ranged() -> tuple[bytes, str, int]:
            r = self.obs.get(self.store, loc, options={"range": (0, n)})
            return bytes(r.bytes()), str(r.meta["e_tag"]), int(r.meta["size"])
        try:
            return self._call(f"reading the header of {loc}", ranged, missing=True)
        except StoreError as e:  # an empty object has no range 0..n (416)
            if "416" not in str(e):
                raise
            r = self._call(f"reading {loc}", self.obs.head, self.store, loc, missing=True)
            if int(r["size"]) != 0:
                raise
            return b"", str(r["e_tag"]), 0

    def get(self, loc: str, version: str) -> bytes:
        r = self._call(f"reading {loc}", self.obs.get, self.store, loc, options={"if_match": version}, missing=True)
        return bytes(self._call(f"reading {loc}", r.bytes))

    def put(self, loc: str, parts: tp.Sequence[bytes], now: float, expect: str | None) -> str:
        mode: tp.Any = "create" if expect is None else "overwrite" if expect == ANY else {"e_tag": expect}
        out = self._call(f"writing {loc}", self.obs.put, self.store, loc, b"".join(parts), mode=mode,
                         use_multipart=False)
        return str(out["e_tag"])

    def delete(self, loc: str, version: str | None = None) -> bool:
        """S3 has no conditional delete here: with `version`, a HEAD first (the store's `gc` explains why the
        window between the two cannot hold a fresh save)."""
        try:
            current = str(self._call(f"reading {loc}", self.obs.head, self.store, loc, missing=True)["e_tag"])
        except FileNotFoundError:
            return False
        if version is not None and current != version:
            return False
        self._call(f"deleting {loc}", self.obs.delete, self.store, loc)
        return True

    def _objects(self, prefix: str) -> list[dict]:
        return self._call(f"listing {prefix or '/'}",
                          lambda: [o for page in self.obs.list(self.store, prefix or None) for o in page])

    def list(self, folder: str = "", suffix: str = "") -> list[Stat]:
        out = []
        for o in self._objects(folder):
            name = o["path"]
            rest = name[len(folder):]
            if name.startswith(folder) and "/" not in rest and name.endswith(suffix):
                out.append(Stat(name, int(o["size"]), o["last_modified"].timestamp(), str(o["e_tag"])))
        return sorted(out, key=lambda s: s.name)

    def folders(self, folder: str) -> list[str]:
        seen = set()
        for o in self._objects(folder):
            rest = o["path"][len(folder):]
            if "/" in rest:
                seen.add(f"{folder}{rest.split('/', 1)[0]}/")
        return sorted(seen)

    def sweep(self, now: float, age: float) -> None:
        """Last-use markers of older stores (an unfinished S3 upload is no object: a bucket lifecycle rule
        aborts them)."""
        stale = [o["path"] for o in self._objects("") if LEGACY_USED in o["path"]]
        for i in range(0, len(stale), 1000):
            self._call("deleting old markers", self.obs.delete, self.store, stale[i:i + 1000])

    def lock(self, name: str) -> tp.ContextManager[None]:
        return contextlib.nullcontext()  # the conditional PUT is the compare-and-swap


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

