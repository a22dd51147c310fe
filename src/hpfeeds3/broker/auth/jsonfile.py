"""The JSON file store: ``{ident: {owner, secret, pubchans, subchans}}``.

Reader: the whole file is held in memory and reloaded when it changes
(``watchfiles`` on its directory, so editors that replace the file by rename
are seen too). A broken file (half-written, bad JSON, wrong shape) keeps the
last good data and logs why; a key that is not valid is "no such key",
logged once. Any shape ``records.parse_keys`` accepts may be served.

Writer: every write replaces the whole file atomically (a temporary file in
the same directory, fsync, ``os.replace``), so a broker reads the old or the
new version, never half of one. A new file is created with mode 0600 (it
holds secrets); an existing store file keeps its mode and, where we may, its
owner. Concurrent writers on one file take turns (``flock`` on its directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

from ..config import ConfigError
from .base import AccessKey, IdentExists, InvalidKeyLog, KeyStoreError, NoSuchIdent, SkipInvalid, StoreUnavailable
from .records import dump_keys, parse_keys

log = logging.getLogger("hpfeeds3.broker.auth.json")

# Mode of a file holding secrets that we create (and of every export).
PRIVATE_MODE = 0o600


def write_atomic(path: str, text: str, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``text`` in one rename.

    ``mode`` None: keep an existing file's mode and owner (a new file gets
    0600); else the file ends up with exactly ``mode``, existing or not.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        else:
            os.chmod(tmp, (st.st_mode & 0o7777) if st else PRIVATE_MODE)
            if st is not None:
                with contextlib.suppress(OSError):
                    os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    """Make a rename or a new file in ``directory`` survive a power loss (best effort)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def _directory_lock(path: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class JsonStore:
    """``--auth PATH.json``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.description = path
        self._keys: dict[str, AccessKey] = {}
        self._invalid = InvalidKeyLog(f"json:{path}")
        self._watcher: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._changed: asyncio.Queue[set[str]] = asyncio.Queue()

    @classmethod
    def from_spec(cls, target: str, *, poll_s: float = 1.0) -> JsonStore:
        return cls(target)  # watched, not polled

    def __repr__(self) -> str:
        return f"json:{self.path}"

    # --- reader ---------------------------------------------------------------------

    async def start(self) -> None:
        if not os.path.isfile(self.path):
            raise ConfigError(f"JSON auth file {self.path!r} does not exist")
        try:
            self._keys = self._read_serving()
        except (OSError, KeyStoreError) as e:
            reason = str(e).removeprefix(f"{self.path}: ")  # the path is said once, here
            raise ConfigError(f"JSON auth file {self.path!r}: {reason}") from e
        log.info("loaded %d keys from %s", len(self._keys), self.path)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None

    async def lookup(self, ident: str) -> AccessKey | None:
        return self._keys.get(ident)

    def lookup_now(self, ident: str) -> AccessKey | None:
        return self._keys.get(ident)

    def _read_serving(self) -> dict[str, AccessKey]:
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
        return {k.ident: k for k in parse_keys(text, self.path, skip_invalid=self._invalid.report)}

    def reload(self) -> set[str]:
        """Re-read the file; returns the idents whose key changed (or vanished)."""
        try:
            keys = self._read_serving()
        except (OSError, UnicodeDecodeError, KeyStoreError) as e:
            log.error("keeping the last good keys: cannot reload %s: %s", self.path, e)
            return set()
        changed = {i for i in self._keys.keys() | keys.keys() if self._keys.get(i) != keys.get(i)}
        self._keys = keys
        log.info("reloaded %d keys from %s (%d changed)", len(keys), self.path, len(changed))
        if changed:
            self._changed.put_nowait(changed)
        return changed

    async def changes(self) -> AsyncIterator[set[str] | None]:
        """The idents whose key changed at each reload."""
        while True:
            yield await self._changed.get()

    async def _watch(self) -> None:
        from watchfiles import awatch

        target = os.path.abspath(self.path)
        directory = os.path.dirname(target)
        try:
            # The directory alone, not its subdirectories: the data directory (the durable
            # log, written many times a second) usually sits beside the key file.
            async for _ in awatch(
                directory,
                stop_event=self._stop,
                debounce=200,
                step=50,
                watch_filter=lambda _c, p: p == target,
                recursive=False,
            ):
                self.reload()
        except Exception:
            log.exception("watching %s failed; keys will no longer reload", self.path)

    # --- writer ---------------------------------------------------------------------

    async def open(self, *, create: bool) -> None:
        if os.path.exists(self.path):
            return
        if not create:
            raise StoreUnavailable(f"{self.path}: no such file")
        with self._errors(), _directory_lock(self.path):
            if not os.path.exists(self.path):
                write_atomic(self.path, "{}\n")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            raise StoreUnavailable(f"{self.path}: {err.strerror or err}") from None

    def _load(self, skip_invalid: SkipInvalid | None = None) -> dict[str, AccessKey]:
        with self._errors(), open(self.path, encoding="utf-8") as f:
            text = f.read()
        return {k.ident: k for k in parse_keys(text, self.path, skip_invalid=skip_invalid)}

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[dict[str, AccessKey]]:
        """Load, let the caller change the dict, write it back atomically."""
        with self._errors(), _directory_lock(self.path):
            keys = self._load()
            yield keys
            write_atomic(self.path, dump_keys(keys.values()))

    async def keys(self, *, skip_invalid: SkipInvalid | None = None) -> list[AccessKey]:
        return sorted(self._load(skip_invalid).values(), key=lambda k: k.ident)

    async def get(self, ident: str) -> AccessKey | None:
        return self._load().get(ident)

    async def add(self, key: AccessKey) -> None:
        with self._transaction() as keys:
            if key.ident in keys:
                raise IdentExists(key.ident)
            keys[key.ident] = key

    async def modify(self, ident: str, change: Callable[[AccessKey], AccessKey]) -> AccessKey:
        with self._transaction() as keys:
            if ident not in keys:
                raise NoSuchIdent(ident)
            new = change(keys[ident])
            assert new.ident == ident, "modify must keep the ident"
            keys[ident] = new
        return new

    async def remove(self, ident: str) -> None:
        with self._transaction() as keys:
            if ident not in keys:
                raise NoSuchIdent(ident)
            del keys[ident]

    async def put_many(self, keys: Iterable[AccessKey], *, replace: bool = False) -> int:
        new = list(keys)
        with self._transaction() as current:
            clash = sorted(k.ident for k in new if k.ident in current)
            if clash and not replace:
                raise IdentExists(clash)
            current.update((k.ident, k) for k in new)
        return len(new)
