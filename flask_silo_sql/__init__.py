"""flask-silo-sql: per-client server-side state for Flask APIs, durable in SQL.

The API of flask-silo 0.1.6 (change the import), with sessions, namespaces,
expired SIDs, files and tasks kept in SQLite or PostgreSQL through SQLAlchemy,
and the schema managed by Alembic (``flask silo-db upgrade``).
"""

from .cleanup import CleanupDaemon
from .errors import (
    FileCorrupt,
    FileElsewhere,
    FileNotStored,
    FileStorageError,
    FileTooLarge,
    IdempotencyKeyInFlight,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    IdempotencyKeysExhausted,
    IdempotencyUnsupported,
    IdempotentResponseNotKept,
    InsufficientStorage,
    InvalidFilename,
    NamespaceError,
    NamespaceTaken,
    OutsideApiPrefix,
    RegisteredTooLate,
    RequestBodyIncomplete,
    ResponseNotStorable,
    SchemaError,
    SessionBusy,
    SessionExpired,
    SiloError,
    StateConflict,
    StateInsufficientStorage,
    StateNotSerializable,
    StateTooLarge,
    StateUnreadable,
    StorageUnavailable,
    TaskAlreadyRunning,
    TaskCancelled,
    TaskLeaseLost,
    ViewDecoratorOrder,
)
from .ext import Silo
from .files import FileStore, StoredFile
from .keys import SessionKey, session_key
from .sql import SQLStorage, schema
from .sql.schema import alembic_include_name, alembic_include_object
from .storage import InMemoryStorage, SiloStorage
from .store import SessionStore
from .tasks import BackgroundTask, TaskRunner, TaskState

__version__ = "0.1.0"

__all__ = [
    "BackgroundTask",
    "CleanupDaemon",
    "FileCorrupt",
    "FileElsewhere",
    "FileNotStored",
    "FileStorageError",
    "FileStore",
    "FileTooLarge",
    "IdempotencyKeyInFlight",
    "IdempotencyKeyInvalid",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
    "IdempotencyKeysExhausted",
    "IdempotencyUnsupported",
    "IdempotentResponseNotKept",
    "InMemoryStorage",
    "InsufficientStorage",
    "InvalidFilename",
    "NamespaceError",
    "NamespaceTaken",
    "OutsideApiPrefix",
    "RegisteredTooLate",
    "RequestBodyIncomplete",
    "ResponseNotStorable",
    "SQLStorage",
    "SchemaError",
    "SessionBusy",
    "SessionExpired",
    "SessionKey",
    "SessionStore",
    "Silo",
    "SiloError",
    "SiloStorage",
    "StateConflict",
    "StateInsufficientStorage",
    "StateNotSerializable",
    "StateTooLarge",
    "StateUnreadable",
    "StorageUnavailable",
    "StoredFile",
    "TaskAlreadyRunning",
    "TaskCancelled",
    "TaskLeaseLost",
    "TaskRunner",
    "TaskState",
    "ViewDecoratorOrder",
    "__version__",
    "alembic_include_name",
    "alembic_include_object",
    "schema",
    "session_key",
]
