"""All-or-nothing groups of puts for the NVMe tier (see :class:`~.nvme.NvmeStore`).

An optimizer step rewrites every sub-group of a partition; if the disk fills half-way, a store
that commits each put as it lands is left with some sub-groups at step t+1 and the rest at step t.
Inside a transaction a completed write goes to a new extent but does not replace the committed
copy (``_finish`` appends it to ``_txn``): ``commit`` switches every key at once, ``abort`` frees
the new extents so every key keeps the value it had before ``begin``. Old and new copies coexist
until the commit, so a transactional rewrite of S bytes needs 2·S on disk (plus the pool's slack).

    store.begin()
    ... puts ...
    store.prepare()       # waits; raises StoreFullError if any write failed (nothing switched yet)
    store.commit()        # or store.abort()
"""
from __future__ import annotations

from parallel.offload.errors import StoreError, StoreFullError

__all__ = ["TransactionsMixin"]


class TransactionsMixin:
    """Uses the store's ``_lock``, ``_ops``, ``_stall``, ``_unreported``, ``_table``, ``_meta``,
    ``_slots``, ``_drop_slot``, ``_extents``, ``_commit``, ``flush`` and ``_txn`` / ``_txn_keys``."""

    def begin(self) -> None:
        """Open a transaction: puts from now on are committed together by :meth:`commit`."""
        with self._lock:
            if self._txn is not None:
                raise StoreError("begin(): a transaction is already open; commit() or abort() it first")
            self.flush()                               # earlier puts settle (and fail) outside it
            self._txn, self._txn_keys = [], set()

    def prepare(self) -> None:
        """Wait for every write of the open transaction; raise (StoreFullError when the disk is full)
        if any failed. The transaction stays open: :meth:`commit` or :meth:`abort` it."""
        with self._lock:
            self._need_txn("prepare")
            for op in list(self._ops):
                self._stall(op)
            if self._unreported:
                failed = self._unreported
                cls = StoreFullError if any(isinstance(op.error, StoreFullError) for op in failed) else StoreError
                raise cls(f"{len(failed)} put(s) of the transaction failed (keys {[op.key for op in failed][:4]!r}…): "
                          f"{failed[0].error}") from failed[0].error

    def commit(self) -> None:
        """:meth:`prepare`, then make every put of the transaction the committed value at once."""
        with self._lock:
            self.prepare()
            txn, self._txn, self._txn_keys = self._txn, None, set()
            for key, extent, meta in txn:
                self._commit(key, extent, meta)

    def abort(self) -> None:
        """Drop every put of the open transaction: each key keeps its value from before begin().
        Resident copies of keys put in the transaction must have been released."""
        with self._lock:
            self._need_txn("abort")
            for op in list(self._ops):
                self._stall(op)
            txn, keys = self._txn, self._txn_keys
            self._txn, self._txn_keys = None, set()
            for _, extent, _ in txn:
                self._extents.free(extent)
            for key in keys:
                if key in self._table:
                    self._meta[key] = self._table[key][1]
                else:
                    self._meta.pop(key, None)
                slot = self._slots.get(key)
                if slot is not None:                   # a stale resident copy must not be served
                    self._drop_slot(slot)
            for op in self._unreported:
                op.reported = True
            self._unreported = []

    @property
    def in_transaction(self) -> bool:
        return self._txn is not None

    def _need_txn(self, what: str) -> None:
        if self._txn is None:
            raise StoreError(f"{what}(): no transaction is open; call begin() first")

    def _check_txn_read(self, key) -> None:
        if key in self._txn_keys:
            raise StoreError(f"read of {key!r}, which was put in the open transaction and is not resident: "
                             f"its new value is readable after commit()")

