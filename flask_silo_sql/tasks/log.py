"""The tasks' logger: one name, ``flask_silo_sql.tasks``, for every module of the feature."""

from __future__ import annotations

from ..logs import silo_logger

logger = silo_logger("flask_silo_sql.tasks")
