"""Which backends a setting names, refused at once when it cannot work."""

from __future__ import annotations


def check_backend(backend: str) -> None:
    """Refuse at once a backend that cannot work (an unknown protocol, fsspec missing)."""
    if backend in ("local", "database"):
        return
    if "://" not in backend:
        raise ValueError(
            f"unknown file backend {backend!r}: use 'local', 'database' or an fsspec URL"
        )
    try:
        import fsspec
    except ImportError:
        raise ValueError(
            f"the file backend {backend!r} needs fsspec: pip install 'flask-silo-sql[fsspec]'"
        ) from None
    protocol = backend.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"the file backend {backend!r} cannot be used: {exc}") from None
