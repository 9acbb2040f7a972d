"""AWS Signature Version 4 for bodiless S3 requests (GET, HEAD), computed without botocore.

botocore's signer rebuilds an AWSRequest, header maps and four HMACs for every request. Here the
derived signing key is cached per (secret, day), the date string per second, and the canonical
request is one f-string: the result is byte-identical to ``botocore.auth.S3SigV4Auth`` (checked
in tests/test_storage.py and tests/test_http1.py, and end to end by moto with IAM authentication
on). `request_head` writes the signed request straight as the bytes to send.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import NamedTuple
from urllib.parse import quote

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
ALGORITHM = "AWS4-HMAC-SHA256"


class Credentials(NamedTuple):
    access_key: str
    secret_key: str
    token: str | None = None


def canonical_uri(bucket: str, key: str) -> str:
    """Path-style URI path, encoded once as S3 expects (botocore: ``percent_encode(safe='/~')``)."""
    return "/" + quote(bucket, safe="") + "/" + quote(key, safe="/~")


class SigV4Signer:
    """Signs requests for one region and service; cheap to call on every tile read."""

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._scope_tail = f"/{region}/{service}/aws4_request"
        self._key_for: tuple[str, str] | None = None
        self._key = b""
        self._mac = hmac.new(b"", digestmod=hashlib.sha256)  # keyed with `_key`: copied per signature
        self._credential_for: tuple[str, str] | None = None
        self._credential = ""  # "AWS4-HMAC-SHA256 Credential=<access key>/<day>/<region>/<service>/aws4_request"
        self._second = -1
        self._amz_date = ""

    def _now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))
            self._second = second
        return self._amz_date

    def _signing_key(self, secret: str, day: str) -> bytes:
        if self._key_for != (secret, day):
            k = hmac.digest(f"AWS4{secret}".encode(), day.encode(), "sha256")
            k = hmac.digest(k, self.region.encode(), "sha256")
            k = hmac.digest(k, self.service.encode(), "sha256")
            self._key = hmac.digest(k, b"aws4_request", "sha256")
            self._mac = hmac.new(self._key, digestmod=hashlib.sha256)
            self._key_for = (secret, day)
        return self._key

    def _signature(self, secret: str, day: str, string_to_sign: str) -> bytes:
        """HMAC-SHA256 with the day's signing key, from a copy of a MAC already keyed (OpenSSL 3
        spends more on setting a key up than on hashing a string to sign: 0.9 µs against 1.5 µs)."""
        self._signing_key(secret, day)
        mac = self._mac.copy()
        mac.update(string_to_sign.encode())
        return mac.digest()

    def request_head(
        self,
        credentials: Credentials,
        method: str,
        host: str,
        uri: str,
        range_header: str | None = None,
        amz_date: str | None = None,
    ) -> bytes:
        """The whole signed request head (request line, Host, Range, x-amz-*, Authorization,
        ``Accept-Encoding: identity``, blank line) as bytes to write, for a request with no body or
        query: no dict of headers in between. `host` must be the Host header as sent (``host[:port]``,
        port omitted when default); `uri` the encoded path (see `canonical_uri`), also the target."""
        amz_date, signed, signature = self._signed(credentials, method, host, uri, range_header, amz_date)
        range_line = f"Range: {range_header}\r\n" if range_header is not None else ""
        token_line = f"X-Amz-Security-Token: {credentials.token}\r\n" if credentials.token else ""
        return (
            f"{method} {uri} HTTP/1.1\r\nHost: {host}\r\n{range_line}X-Amz-Content-SHA256: {EMPTY_SHA256}\r\n"
            f"X-Amz-Date: {amz_date}\r\n{token_line}Authorization: {self._credential}, SignedHeaders={signed}, "
            f"Signature={signature}\r\nAccept-Encoding: identity\r\n\r\n"
        ).encode("latin-1")

    def _signed(self, credentials: Credentials, method: str, host: str, uri: str, range_header: str | None,
                amz_date: str | None) -> tuple[str, str, str]:
        """(x-amz-date, signed header names, hex signature) of a request with no body or query;
        `self._credential` is left holding the Authorization's `Credential=` part for this day."""
        amz_date = amz_date or self._now()
        day = amz_date[:8]
        token = credentials.token
        if range_header is not None:
            canonical = (f"{method}\n{uri}\n\nhost:{host}\nrange:{range_header}\n"
                         f"x-amz-content-sha256:{EMPTY_SHA256}\nx-amz-date:{amz_date}\n")
            signed = "host;range;x-amz-content-sha256;x-amz-date"
        else:
            canonical = (f"{method}\n{uri}\n\nhost:{host}\n"
                         f"x-amz-content-sha256:{EMPTY_SHA256}\nx-amz-date:{amz_date}\n")
            signed = "host;x-amz-content-sha256;x-amz-date"
        if token:
            canonical += f"x-amz-security-token:{token}\n"
            signed += ";x-amz-security-token"
        canonical += f"\n{signed}\n{EMPTY_SHA256}"
        scope = day + self._scope_tail
        string_to_sign = f"{ALGORITHM}\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = self._signature(credentials.secret_key, day, string_to_sign).hex()
        if self._credential_for != (credentials.access_key, day):
            self._credential = f"{ALGORITHM} Credential={credentials.access_key}/{scope}"
            self._credential_for = (credentials.access_key, day)
        return amz_date, signed, signature
