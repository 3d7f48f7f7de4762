"""Before a run writes anything: can this environment read every ``s3://`` stream's ``index.json``?

Streaming reads object stores with boto3 (credentials as boto3 finds them, the endpoint from
``S3_ENDPOINT_URL``) only once the loader is built, after the run directory has its recipe and lock;
a missing credential or a wrong endpoint would then stop a run that has already written there. One
``HEAD`` per stream, with the same credentials and endpoint, settles it first (docs/data.md)."""
from __future__ import annotations

import os

from rwkvclip_dist.data.config import StreamConfig

HINT = "set S3_ENDPOINT_URL (S3-compatible servers) and the AWS credentials (docs/data.md, Object stores)"


def check_s3_streams(streams: list[StreamConfig]) -> None:
    """``PermissionError``, ``FileNotFoundError`` or ``ConnectionError`` naming ``data.streams`` and the
    stream when an ``s3://`` stream's index cannot be read; other URLs are left to Streaming."""
    remotes = [s.remote for s in streams if s.remote.startswith("s3://")]
    if not remotes:
        return
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    except ImportError as err:
        raise ImportError(f"data.streams: {remotes[0]} needs boto3 ({err}); pip install boto3") from None
    client = boto3.session.Session().client(
        "s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
        config=Config(connect_timeout=10, read_timeout=30, retries={"max_attempts": 2}))
    for remote in remotes:
        bucket, _, prefix = remote.removeprefix("s3://").partition("/")
        key = f"{prefix.strip('/')}/index.json" if prefix.strip("/") else "index.json"
        where = f"data.streams: {remote}"
        try:
            client.head_object(Bucket=bucket, Key=key)
        except NoCredentialsError:
            raise PermissionError(f"{where}: no AWS credentials found in this environment; {HINT}") from None
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", "?"))
            if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                raise FileNotFoundError(f"{where}: s3://{bucket}/{key} not found (HTTP {code})") from None
            raise PermissionError(f"{where}: reading s3://{bucket}/{key} was refused (HTTP {code}); {HINT}") from None
        except BotoCoreError as err:
            endpoint = os.environ.get("S3_ENDPOINT_URL") or "AWS's default endpoint"
            raise ConnectionError(f"{where}: cannot reach {endpoint} ({err}); {HINT}") from None
