"""``Closing``: the context-manager and finalizer half of a transport's lifetime, written once.

A subclass defines an idempotent ``close()``; this base adds ``with transport: ...`` and a ``__del__``
that calls ``close()`` and never raises (a half-built object or interpreter shutdown included).
"""

from __future__ import annotations

from typing import TypeVar

_T = TypeVar("_T", bound="Closing")


class Closing:
    """Mixin: ``__enter__`` returns self, ``__exit__`` and ``__del__`` call the subclass's ``close()``."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


__all__ = ["Closing"]
