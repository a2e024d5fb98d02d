"""TaskRunner: a process's claimer of durable task runs (a worker, or a web process).

It claims due runs (queued, retrying once their delay is over, or whose lease
lapsed) up to its concurrency and runs each in a thread of its own, as the
run's next attempt. ``flask silo-db worker`` is one in the foreground; with
``SILO_TASK_RUNNER = "thread"`` every web process runs one in a daemon thread,
so a run whose process died is picked up by any live process of the app. It
wakes up when a run is queued (``LISTEN/NOTIFY`` on PostgreSQL) and polls
about every ``poll_interval`` seconds in any case, each wait drawn within
±:data:`POLL_JITTER` of it: processes started together (a deploy) would
otherwise poll in step, so a run queued between two polls would wait for the
next one of them all, not of the soonest (on SQLite, where nothing wakes them,
that is every run's latency). Stopping it stops the claims,
lets running attempts finish within a grace period, then hands the runs it
still holds back to the queue, so they run elsewhere at once.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from ..forks import at_fork
from .log import logger
from .process import PROCESS
from .runs import Claimed

if TYPE_CHECKING:
    from ..config import SiloConfig
    from .queue import TaskQueue
    from .spec import TaskSpec


class Queues(Protocol):
    """Where a store's backend keeps its durable runs."""

    def task_queue(self) -> TaskQueue: ...


class RunnerStore(Protocol):
    """What a runner uses of its store (a :class:`~flask_silo_sql.SessionStore`)."""

    @property
    def backend(self) -> Queues: ...

    @property
    def tasks(self) -> Mapping[str, TaskSpec]: ...

    @property
    def heartbeat_timeout(self) -> float: ...

POLL_JITTER = 0.25
"""The spread of a runner's wait between two polls, as a fraction of the poll interval."""


class TaskRunner:
    """Claims and runs durable task runs (see the module docstring)."""

    @classmethod
    def from_config(
        cls,
        store: RunnerStore,
        config: SiloConfig,
        *,
        kind: str,
        concurrency: int | None = None,
        listen: bool = True,
    ) -> TaskRunner:
        """A runner with the app's ``SILO_TASK_CONCURRENCY`` (unless *concurrency*) and
        ``SILO_TASK_POLL_INTERVAL``."""
        return cls(
            store,
            kind=kind,
            concurrency=concurrency or config.task_concurrency,
            poll_interval=config.task_poll_interval,
            listen=listen,
        )

    def __init__(
        self,
        store: RunnerStore,
        *,
        kind: str = "worker",
        concurrency: int = 4,
        poll_interval: float = 0.5,
        listen: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError("a task runner needs a concurrency of at least 1")
        self.store = store
        self.kind = kind
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.listen = listen
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._hurry = threading.Event()
        self._active = 0
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._pid = 0
        self._claiming = threading.Lock()
        """Held while the loop claims and starts runs (a fork waits for it)."""
        self._fork_hook = False
        self._stopped = False
        """Stopped in this process (then a child it forks starts none either)."""
        self.claimed = 0
        """Attempts this runner claimed so far."""

    @property
    def worker_id(self) -> str:
        return PROCESS.id

    @property
    def active(self) -> int:
        """Attempts of this runner running now."""
        with self._idle:
            return self._active

    @property
    def running(self) -> bool:
        """Whether its thread is alive in this process."""
        return self._thread is not None and self._pid == os.getpid() and self._thread.is_alive()

    def _queue(self) -> TaskQueue:
        return self.store.backend.task_queue()

    # -- starting and stopping ---------------------------------------------------------

    def start_with_process(self) -> None:
        """Start now, and in every child this process forks from now on (gunicorn's
        workers under ``--preload``), with nothing of this process's claimer in it."""
        self.start()
        if not self._fork_hook:
            self._fork_hook = True
            at_fork(
                self,
                before=lambda runner: runner._claiming.acquire(),  # not mid-claim
                in_parent=lambda runner: runner._claiming.release(),
                in_child=TaskRunner._start_in_child,
            )

    def _start_in_child(self) -> None:
        """After a fork: the parent's threads are not here, and its locks may be held."""
        self._claiming = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._hurry = threading.Event()
        self._idle = threading.Condition()
        self._thread = None
        self._listener = None
        self.claimed = 0
        if self._pid != 0 and not self._stopped:
            self.start()

    def start(self) -> None:
        """Run the claim loop in a daemon thread (idempotent; again after a fork)."""
        if self.running:
            return
        self._stopped = False
        self._stop.clear()
        self._hurry.clear()
        self._pid = os.getpid()
        self._listener = None  # a thread of another process, or of a stopped run
        with self._idle:
            self._active = 0
        self._thread = threading.Thread(target=self.run, name="flask-silo-runner", daemon=True)
        self._thread.start()

    def stop(self, grace: float = 0.0) -> int:
        """Stop claiming; wait up to *grace* seconds for running attempts; hand back the rest.

        Returns how many runs were handed back.
        """
        self.stop_claiming()
        if not self.store.tasks:
            return 0  # nothing was ever claimed here
        deadline = time.monotonic() + grace
        with self._idle:
            while self._active and time.monotonic() < deadline and not self._hurry.is_set():
                self._idle.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        queue = self._queue()
        handed = 0
        try:
            handed = queue.hand_back(self.worker_id)
            queue.unregister(self.worker_id)
        except Exception as exc:  # the database is away: the leases lapse instead
            logger.warning("could not hand back this process's task runs: %s", exc)
        return handed

    def stop_claiming(self) -> None:
        """Claim no more, and wait for a claim under way to hand its runs to their threads,
        so :attr:`active` counts every run this process holds."""
        self._stopped = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.poll_interval + 10)

    def hurry(self) -> None:
        """End the grace period of a :meth:`stop` under way: hand back what still runs now."""
        self._hurry.set()

    def wake(self) -> None:
        """Look for due runs now."""
        self._wake.set()

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        """The claim loop, until :meth:`stop` (in the calling thread)."""
        beat_every = self.store.heartbeat_timeout / 4
        last_beat = 0.0
        failing = False
        queue = self._queue()
        while not self._stop.is_set():
            if not self.store.tasks:  # no durable task in this app: nothing to claim
                self._stop.wait(self.poll_interval)
                continue
            if self.listen and self._listener is None:
                self._listen(queue)
            claimed: list[Claimed] = []
            free = self.concurrency - self.active
            with self._claiming:
                try:
                    if time.monotonic() - last_beat >= beat_every:
                        queue.register(self.worker_id, self.kind, self.concurrency)
                        last_beat = time.monotonic()
                    if free > 0:
                        claimed = queue.claim(self.worker_id, free)
                    if failing:
                        logger.info("task runner: the database answers again")
                    failing = False
                except Exception as exc:
                    if not failing:
                        logger.warning("task runner: cannot claim task runs now (%s)", exc)
                    failing = True
                for run in claimed:
                    self._execute(run)
            if claimed and len(claimed) == free:
                continue  # more may be due: claim again while there is room
            self._wake.wait(timeout=self._poll_wait())
            self._wake.clear()

    def _poll_wait(self) -> float:
        """Seconds until the next poll: the interval, give or take its jitter (mean kept)."""
        spread = random.uniform(1 - POLL_JITTER, 1 + POLL_JITTER)  # noqa: S311 (not a secret)
        return self.poll_interval * spread

    def _execute(self, run: Claimed) -> None:
        with self._idle:
            self._active += 1
        self.claimed += 1
        try:
            run.task.execute(run, on_done=self._done)
        except BaseException:
            self._done()
            raise

    def _done(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()
        self._wake.set()

    def _listen(self, queue: TaskQueue) -> None:
        def listen() -> None:
            if not queue.listen(self._stop, self._wake.set):
                return  # no notifications on this database: polling only

        self._listener = threading.Thread(target=listen, name="flask-silo-listen", daemon=True)
        self._listener.start()
