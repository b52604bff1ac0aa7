"""Which session holds each row of the cache pool: the one record of it, kept both ways.

The pool (:class:`~engine.cache.sink.SinkCache`) is lent to the sessions through this table: a session's
cache row and its counters there are read through it (:attr:`Session.row <engine.sessions.store.Session.row>`,
``Session.state``), and only the session store changes it, through :meth:`RowTable.assign`,
:meth:`RowTable.release` and :meth:`RowTable.swap`.
"""

from __future__ import annotations

from engine.cache.sink import RowState, SinkCache


class RowTable:
    """The rows of a lent cache pool and the session (by id) each one holds."""

    def __init__(self, cache: SinkCache) -> None:
        self.cache = cache  # lent by the engine, which builds the pool
        self._owners: list[str | None] = [None] * cache.rows
        self._rows: dict[str, int] = {}

    def owner_of(self, row: int) -> str | None:
        """The id of the session holding ``row`` (None: free)."""
        return self._owners[row]

    def row_of(self, session_id: str) -> int | None:
        """The row ``session_id`` holds (None: not resident)."""
        return self._rows.get(session_id)

    def state(self, session_id: str) -> RowState | None:
        """The counters of the row ``session_id`` holds (None: not resident)."""
        row = self._rows.get(session_id)
        return self.cache.state(row) if row is not None else None

    def assign(self, row: int, session_id: str) -> None:
        """Give the free ``row`` to ``session_id``, which holds no other."""
        if self._owners[row] is not None or session_id in self._rows:
            raise RuntimeError(f"row {row} is held by {self._owners[row]}, or {session_id} holds another")
        self._owners[row] = session_id
        self._rows[session_id] = row

    def release(self, session_id: str) -> int | None:
        """Free the row ``session_id`` holds; returns it (None: it held none)."""
        row = self._rows.pop(session_id, None)
        if row is not None:
            self._owners[row] = None
        return row

    def swap(self, a: int, b: int) -> None:
        """Exchange rows ``a`` and ``b``: their contents in the pool and their holders."""
        self.cache.swap_rows(a, b)
        first, second = self._owners[a], self._owners[b]
        self._owners[a], self._owners[b] = second, first
        for session_id, row in ((second, a), (first, b)):
            if session_id is not None:
                self._rows[session_id] = row

    def free_row(self) -> int | None:
        """The lowest free row (None: every row is held)."""
        for row, owner in enumerate(self._owners):
            if owner is None:
                return row
        return None

    def holders(self) -> list[str]:
        """The ids of the resident sessions, by row."""
        return [owner for owner in self._owners if owner is not None]

    def __len__(self) -> int:
        """How many rows are held."""
        return len(self._rows)
