"""Every ``SILO_*`` configuration key: its type, default and meaning, in one table.

The table lives in :mod:`flask_silo_sql.config` (with :class:`~flask_silo_sql.config.SiloConfig`,
the values an app reads from it); this module keeps its names where the documentation's
build and the reference's test look for them.
"""

from __future__ import annotations

from .config import BY_KEY, SETTINGS, Setting

__all__ = ["BY_KEY", "SETTINGS", "Setting"]
