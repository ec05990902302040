"""Following a shared store's change log, so a copy of the gallery in memory stays current.

`ChangeFollower` runs `catch_up()` (the owner's: read the changes after the last one applied,
apply them) whenever PostgreSQL notifies a commit on app.store.postgres.NOTIFY_CHANNEL, and
every `poll_s` seconds regardless: a notification missed while disconnected only delays a
copy by one poll, because catching up goes by sequence numbers, not by notifications.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg

from app.store.postgres import NOTIFY_CHANNEL

log = logging.getLogger("cdpae.store")


class ChangeFollower:
    def __init__(self, url: str, catch_up: Callable[[], None], poll_s: float = 0.5) -> None:
        self.url = url
        self.catch_up = catch_up
        self.poll_s = poll_s
        self.error: str | None = None  # the last failure to reach the store, until it succeeds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="change-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = self.poll_s
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=3) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    while not self._stop.is_set() and self._catch_up():
                        backoff = self.poll_s
                        # Wake on the first notification or after poll_s, whichever comes first.
                        for _ in conn.notifies(timeout=self.poll_s, stop_after=1):
                            pass
            except psycopg.Error as exc:
                self._failed(exc)
            self._stop.wait(backoff)  # reconnect after a failure, backing off up to 5 s
            backoff = min(2 * backoff, 5.0)

    def _catch_up(self) -> bool:
        try:
            self.catch_up()
        except Exception as exc:  # StoreUnavailableError mostly; the thread must not die
            self._failed(exc)
            return False
        if self.error is not None:
            log.info("gallery store reachable again; caught up")
        self.error = None
        return True

    def _failed(self, exc: BaseException) -> None:
        if self.error is None:
            log.warning("can't follow the gallery store (%s); searches answer from memory", exc)
        self.error = f"{type(exc).__name__}: {exc}"
