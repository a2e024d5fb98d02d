"""Background tasks: a run in a thread with progress, linked to its session's row, durable
runs with leases and retries, and the process that claims them.

- :mod:`.task`: :class:`BackgroundTask`, what a view starts and a target reports through;
- :mod:`.state`: :class:`TaskState`, the snapshot a status endpoint returns;
- :mod:`.spec`: a registered function (``@silo.task``) and its retries;
- :mod:`.runs`: a durable run and a claimed attempt, built from their rows;
- :mod:`.home`: :class:`TaskHome`, where a linked task's state lives (the storage's side);
- :mod:`.process`: this process's identity, and what it hands back at exit;
- :mod:`.runner`: :class:`TaskRunner`, a process's claimer of durable runs;
- :mod:`.local`: the task queue of a storage without tables (nothing in it, ever).
"""

from __future__ import annotations

from .home import TaskHome
from .log import logger
from .process import HAND_BACK, PROCESS
from .runner import TaskRunner
from .runs import Claimed, Durable
from .spec import (
    MAX_RETRY_DELAY_S,
    NAMESPACE_ARG,
    SPEC_ATTRIBUTE,
    TaskSpec,
    mark_registered,
    retry_delay,
    spec_of,
    unregistered,
)
from .state import CANCEL_OUTCOMES, LOST_WORKER, WAITING, RunRow, StoredTask, TaskState
from .task import TASK_MARKER, BackgroundTask, running_homes

__all__ = [
    "CANCEL_OUTCOMES",
    "HAND_BACK",
    "LOST_WORKER",
    "MAX_RETRY_DELAY_S",
    "NAMESPACE_ARG",
    "PROCESS",
    "SPEC_ATTRIBUTE",
    "TASK_MARKER",
    "WAITING",
    "BackgroundTask",
    "Claimed",
    "Durable",
    "RunRow",
    "StoredTask",
    "TaskHome",
    "TaskRunner",
    "TaskSpec",
    "TaskState",
    "logger",
    "mark_registered",
    "retry_delay",
    "running_homes",
    "spec_of",
    "unregistered",
]
