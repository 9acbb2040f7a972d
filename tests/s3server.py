"""A moto S3 server on a free loopback port, in this process (starts in ~0.3 s).

moto accepts any key and secret and checks no signature unless IAM authentication is switched on
(`iam_authentication`, used to prove the SigV4 signer end to end). All moto servers of one
process share the same in-memory buckets.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import botocore.session
from botocore.config import Config
from moto.server import ThreadedMotoServer

KEY = "testing"
SECRET = "testing"
REGION = "us-east-1"


class MotoS3Server:
    """`url` (``http://127.0.0.1:<port>``), `name` (``127.0.0.1:<port>``, the cluster name), `port`."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._server = ThreadedMotoServer(ip_address=host, port=0, verbose=False)
        self.host = host
        self.port = 0
        self._client: Any = None

    def start(self) -> MotoS3Server:
        self._server.start()
        self.host, self.port = self._server.get_host_and_port()
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.name}"

    def client(self, service: str = "s3", key: str = KEY, secret: str = SECRET) -> Any:
        """A plain (sync) botocore client on this server, for test setup and checks."""
        session = botocore.session.get_session()
        return session.create_client(
            service, endpoint_url=self.url, region_name=REGION, aws_access_key_id=key,
            aws_secret_access_key=secret,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
        )

    @property
    def s3(self) -> Any:
        if self._client is None:
            self._client = self.client()
        return self._client

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self.s3.create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=bucket, Key=key, Body=data)

    def get(self, bucket: str, key: str) -> bytes | None:
        try:
            return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        keys: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def iam_user(self, bucket_policy_resource: str = "*") -> tuple[str, str]:
        """Create an IAM user allowed s3:* and return its (key, secret), valid once auth is on."""
        iam = self.client("iam")
        name = f"user-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        iam.put_user_policy(
            UserName=name, PolicyName="s3",
            PolicyDocument='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", '
            f'"Action": "s3:*", "Resource": "{bucket_policy_resource}"}}]}}',
        )
        access = iam.create_access_key(UserName=name)["AccessKey"]
        return access["AccessKeyId"], access["SecretAccessKey"]


@contextlib.contextmanager
def iam_authentication() -> Iterator[None]:
    """moto checks signatures and IAM permissions inside this block (process-wide switch)."""
    from moto.core.authorization import enable_iam_authentication

    with enable_iam_authentication():
        yield
