"""A real S3 API on loopback for tests: moto's server, reached through plain ``s3://`` URIs.

Code under test uses ``s3://bucket/...`` exactly as in production; only the environment
points the AWS SDK at the local server. pyarrow >= 15 builds ``FileSystem.from_uri("s3://...")``
(what :func:`ttm_ray.dataset.video.filesystem` uses) with ``AWS_ENDPOINT_URL`` as its
endpoint; checked with pyarrow 25. (A bare ``pyarrow.fs.S3FileSystem()`` does *not* read it,
which is why the bucket is created with an explicit ``endpoint_override``.) boto3 and the AWS
CLI read ``AWS_ENDPOINT_URL`` too.

Usage::

    def test_x(s3_bucket: str) -> None:  # "s3://test-<hex>", empty, made for this test
        writer = VersionWriter(f"{s3_bucket}/dataset")

One server per test process (pytest-xdist workers each start their own), on a free port.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest

#: What the fixture sets; a session token or profile from the shell must not leak in.
_UNSET = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3")


def _s3fs(endpoint: str):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1",
                             allow_bucket_creation=True, allow_bucket_deletion=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on ``127.0.0.1:<free port>`` and point the AWS environment at it
    for the whole session; yields the endpoint URL. Stopped (this server only) at the end.

    The variables (``AWS_ENDPOINT_URL``, dummy ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    ``AWS_DEFAULT_REGION=us-east-1``, ``AWS_EC2_METADATA_DISABLED=true``) are set in
    ``os.environ``, so subprocesses started *after* this fixture (Ray workers of a
    ``ray.init()`` that runs later, CLIs) inherit them and read the same buckets. A Ray that
    was already started (e.g. by the session's ``ray_local`` fixture requested earlier) does
    not: request ``s3_server`` before ``ray_local`` when workers must read ``s3://``.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key in _UNSET:
            mp.delenv(key, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A new empty bucket on the test server for one test; yields ``s3://<bucket>``."""
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    fs = _s3fs(s3_server)
    fs.create_dir(bucket)
    yield f"s3://{bucket}"
    fs.delete_dir(bucket)
