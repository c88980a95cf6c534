"""The prefix store's tracked entries: checkpoints written by a commit during speculative decoding.

A tracking commit (``scatter_mtp_states`` / ``replay_mtp_states`` / ``checkpoint_mtp_states`` with
``store=``, ``track_entries=``, ``track_steps=``) writes the state after a draft step into an entry
the engine took with `reserve` before the commit; once the accept lengths are known it keys the
entry with `publish` or returns it with `release`. The checks a commit asks of the store
(`check_tracking`, `check_tracked_entries`) and the record of the stream it wrote on (`tracked_on`)
are here too. [`PrefixStateCache`][mamba_cache.prefix.PrefixStateCache] inherits them.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..core.checks import check_index
from ..core.manager import MambaCacheManagerBase
from .index import PrefixHandle

__all__ = ["TrackedEntries", "on_manager_device"]


def on_manager_device(method: Any) -> Any:
    """Run a store method that touches device memory with its manager's device current.

    A store is used from engine threads and while another GPU's context is current, as its
    manager is; the manager decides what "its device" means (nothing to do on the NumPy backend).
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        manager = self.__dict__.get("manager") or (args[0] if args else kwargs.get("manager"))
        if not isinstance(manager, MambaCacheManagerBase):  # the constructor's own check says what is wrong
            return method(self, *args, **kwargs)
        return manager._run_on_device(method, self, *args, **kwargs)

    return wrapper


class TrackedEntries:
    """The reserve / publish / release protocol of tracked checkpoints, and the checks a tracking commit makes."""

    def check_tracking(self, manager: Any, what: str) -> None:
        """Raise ``ValueError`` unless this store is open and belongs to ``manager`` (``what``: the calling commit)."""
        self._check_open(what)
        if manager is not self.manager:
            raise ValueError(f"{what}: store belongs to another manager; nothing was changed")

    def check_tracked_entries(self, entries: np.ndarray) -> None:
        """NumPy reference: the tracking rows name distinct, reserved entries (``ValueError``)."""
        values, counts = np.unique(entries, return_counts=True)
        if (counts > 1).any():
            raise ValueError(
                f"track_entries must be distinct; entry {int(values[counts > 1][0])} is tracked by "
                f"{int(counts.max())} rows; nothing was changed"
            )
        for entry in values.tolist():
            if entry not in self._reserved:
                raise ValueError(
                    f"track_entries must name entries from reserve(); entry {entry} is not reserved; "
                    "nothing was changed"
                )

    def tracked_on(self, stream: Any) -> None:
        """Called by a commit (or a chunked prefill) after it queued a write into this store's entries on ``stream``.

        ``stream``: as every call takes it (``None``: the manager's ``default_stream``).
        """
        if self.host_entries:
            self._tracked = self._recorded(self._tracked, self.manager._stream(stream))

    @on_manager_device
    def reserve(self, stream: Any = None) -> int | None:
        """Take an entry for a checkpoint tracked during speculative decoding (pinned, no key yet).

        Pass it as ``track_entries[b]`` to ``scatter_mtp_states(..., store=self, ...)``; once the accepted lengths are
        known call [`publish`][mamba_cache.prefix.PrefixStateCache.publish] (the row reached the boundary) or
        [`release`][mamba_cache.prefix.PrefixStateCache.release].

        Args:
            stream: the stream of the commit that will fill the entry (an eviction's offload to the
                host tier is queued on it; ignored by the NumPy backend).

        Returns:
            The entry index, or ``None`` when every entry is pinned (counted as a dropped insert).
        """
        self._check_open("reserve")
        entry = self._take_entry(self.manager._stream(stream))
        if entry is None:
            self.stats.dropped_inserts += 1
            return None
        self._generations[entry] += 1
        self._reserved.add(entry)
        return entry

    def _check_reserved(self, entry: Any) -> int:
        entry = check_index("entry", entry, self.entries)
        if entry not in self._reserved:
            raise ValueError(f"entry {entry} is not reserved (reserve() it first); nothing was changed")
        return entry

    def publish(self, entry: int, tokens: Any) -> PrefixHandle:
        """Key a reserved, filled entry with the prefix it holds the state after, and unpin it.

        If that prefix is already cached elsewhere, the existing entry is refreshed and this one
        released.

        Args:
            entry: from [`reserve`][mamba_cache.prefix.PrefixStateCache.reserve], filled by a tracking commit.
            tokens: ``[n]`` host integer token ids, ``n >= 1``: the prefix up to the tracked position.

        Returns:
            The handle of the entry that now holds the prefix.

        Raises:
            ValueError: ``entry`` is not reserved, or ``tokens`` is empty.
            IndexError / TypeError: ``entry`` out of range / not an integer.
        """
        self._check_open("publish")
        entry = self._check_reserved(entry)
        data, key, tail = self._prefix("tokens", tokens)
        self._reserved.discard(entry)
        existing = self._lookup(key)
        if existing is not None:
            self._free.append(entry)
            return existing
        return self._publish(entry, key, data, tail)

    def release(self, entry: int) -> None:
        """Return a reserved entry that tracked nothing (its row stopped before the boundary).

        Raises:
            ValueError: ``entry`` is not reserved. IndexError / TypeError: out of range / not an integer.
        """
        self._check_open("release")
        entry = self._check_reserved(entry)
        self._reserved.discard(entry)
        self._generations[entry] += 1
        self._free.append(entry)
