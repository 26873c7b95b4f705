"""chunkvault: content-addressed, encrypted, incremental backup storage.

The public API is :class:`chunkvault.Repository`; see README.md for a tour.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Repository", "new_secret", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a lower layer (chunkvault.chunker) does not pull in the store.
    if name == "Repository":
        from .repository import Repository

        return Repository
    if name == "new_secret":
        from .store.crypto import new_secret

        return new_secret
    raise AttributeError(name)
