"""The settings a new app should turn on (see docs/security.md).

The block between the two marker comments is what the docs show, and what
``tests/test_recommended_settings.py`` pastes into the quickstart
(``examples/basic_app.py``, right after ``app = Flask(__name__)``) to check
that it works there as it stands. It reads two environment variables:
``FLASK_SECRET_KEY`` (the app's secret key) and, for namespaces registered
with ``encrypted=True``, ``SILO_ENCRYPTION_KEYS`` (which silo reads itself).
"""

from __future__ import annotations

from flask import Flask

from flask_silo_sql import Silo

app = Flask(__name__)
# -- recommended settings: begin
app.config.from_prefixed_env()  # FLASK_SECRET_KEY: signs the SIDs silo issues, keys log tags
app.config.update(
    SILO_STRICT_SIDS=True,  # only SIDs this server issued: no session fixation
    SILO_SID_MAX_AGE=24 * 3600,  # a SID is refused a day after its issue, ...
    SILO_SESSION_MAX_AGE=24 * 3600,  # ... and every session ends then, however active
)
# SILO_ENCRYPTION_KEYS (environment): Fernet keys, for register(..., encrypted=True)
# -- recommended settings: end
silo = Silo(app, query_param="")  # SIDs only in the header, never in a URL
