"""Async byte access to ROK4 storage: FILE (plain or ``file://`` paths) and S3 (``s3://bucket[@host]/key``).

``Storage(settings)`` routes each path to its backend; reads return None for absent objects and
raise `StorageError` (502/503 material) only when the storage itself fails; `StorageUnavailable`
(with `retry_after`) when it is failing for now: retries ran out, or its circuit is open.
"""

from .backend import Backend
from .breaker import CircuitBreaker
from .errors import InvalidPathError, LinkLoopError, StorageError, StorageTimeout, StorageUnavailable
from .file import FileBackend
from .links import decode_link, encode_link
from .paths import Scheme, StoragePath, basename, dirname, is_within, join, parse_path
from .retry import RetryPolicy, TransientError
from .router import Storage
from .s3 import S3Backend
from .sigv4 import SigV4Signer

__all__ = [
    "Backend",
    "CircuitBreaker",
    "FileBackend",
    "InvalidPathError",
    "LinkLoopError",
    "RetryPolicy",
    "S3Backend",
    "Scheme",
    "SigV4Signer",
    "Storage",
    "StorageError",
    "StoragePath",
    "StorageTimeout",
    "StorageUnavailable",
    "TransientError",
    "basename",
    "decode_link",
    "dirname",
    "encode_link",
    "is_within",
    "join",
    "parse_path",
]
