"""hpfeeds3: an hpfeeds broker, clients and benchmark."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # Lazy: importlib.metadata pulls in email and socket, and the protocol
    # package must stay importable without any I/O module.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("hpfeeds3")
        except PackageNotFoundError:  # a source tree that is not installed
            return "0.0.0"
    raise AttributeError(name)
