"""The JSON file key store: ``{ident: {owner, secret, pubchans, subchans}}``.

Every write replaces the whole file atomically: a temporary file in the same
directory, fsync, then ``os.replace``. A broker reading the file sees the old
or the new version, never half of one. A new file is created with mode 0600
(it holds secrets); an existing file keeps its mode and, where we may, its
owner. Concurrent ``keys`` commands on one file are serialised by an advisory
lock on its directory (``flock``, where the platform has it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator

from ..auth.base import AccessKey
from .errors import IdentExists, NoSuchIdent, StoreUnavailable
from .records import dump_keys, parse_keys
from .store import KeyStore

# Mode of a JSON key file we create: it holds secrets.
NEW_FILE_MODE = 0o600


def write_atomic(path: str, text: str, *, mode: int = NEW_FILE_MODE) -> None:
    """Replace ``path`` with ``text`` in one rename; keep an existing file's mode and owner."""
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
        os.chmod(tmp, (st.st_mode & 0o7777) if st else mode)
        if st is not None:
            with contextlib.suppress(OSError):
                os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
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


class JsonKeyStore(KeyStore):
    def __init__(self, path: str, *, create: bool = False) -> None:
        self.path = path
        self.description = path
        if not create and not os.path.exists(path):
            raise StoreUnavailable(f"{path}: no such file")
        if create and not os.path.exists(path):
            with self._errors(), _directory_lock(path):
                if not os.path.exists(path):
                    write_atomic(path, "{}\n")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            raise StoreUnavailable(f"{self.path}: {err.strerror or err}") from None

    def _load(self) -> dict[str, AccessKey]:
        with self._errors(), open(self.path, encoding="utf-8") as f:
            text = f.read()
        return {k.ident: k for k in parse_keys(text, self.path)}

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[dict[str, AccessKey]]:
        """Load, let the caller change the dict, write it back atomically."""
        with self._errors(), _directory_lock(self.path):
            keys = self._load()
            yield keys
            write_atomic(self.path, dump_keys(keys.values()))

    def keys(self) -> list[AccessKey]:
        return sorted(self._load().values(), key=lambda k: k.ident)

    def get(self, ident: str) -> AccessKey | None:
        return self._load().get(ident)

    def add(self, key: AccessKey) -> None:
        with self._transaction() as keys:
            if key.ident in keys:
                raise IdentExists(key.ident)
            keys[key.ident] = key

    def modify(self, ident: str, change: Callable[[AccessKey], AccessKey]) -> AccessKey:
        with self._transaction() as keys:
            if ident not in keys:
                raise NoSuchIdent(ident)
            new = change(keys[ident])
            assert new.ident == ident, "modify must keep the ident"
            keys[ident] = new
        return new

    def remove(self, ident: str) -> AccessKey:
        with self._transaction() as keys:
            if ident not in keys:
                raise NoSuchIdent(ident)
            return keys.pop(ident)

    def put_many(self, keys: Iterable[AccessKey], *, replace: bool = False) -> int:
        new = list(keys)
        with self._transaction() as current:
            clash = sorted(k.ident for k in new if k.ident in current)
            if clash and not replace:
                raise IdentExists(clash)
            current.update((k.ident, k) for k in new)
        return len(new)
