"""An S3-compatible server on 127.0.0.1 (moto's standalone server) for the tests and benchmarks.

moto_server speaks the S3 REST API over HTTP (Flask/Werkzeug), so Streaming's own S3 download path
(boto3, ``S3_ENDPOINT_URL``, credentials from the environment) runs unchanged against it; nothing is
patched in-process. It runs as a subprocess so forked ranks and DataLoader workers share it, and its
access log (one line per request) shows which objects were fetched how often. Needs ``moto[server]``
(the ``test`` and ``bench`` extras). A harness, not part of the reader: it lives in the package only
because ``tools/bench_input_pipeline.py`` needs it too and tools import the package alone (never
tests/); no module of the package imports it (tests/test_layout.py).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path


_GET = re.compile(r'"GET /([^ ?]+)[^ ]* HTTP/1\.[01]" 200 ')
# moto accepts any credentials; boto3 refuses to sign without some.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "rwkvclip-local", "AWS_SECRET_ACCESS_KEY": "rwkvclip-local-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


class LocalS3Server:
    """``with LocalS3Server(log) as s3:`` starts moto_server on a free port and stops it on exit."""

    def __init__(self, log_path: str | Path) -> None:
        self.log_path = Path(log_path)
        self.url = ""
        self._proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs: Streaming reads S3_ENDPOINT_URL, boto3 the credentials."""
        return {"S3_ENDPOINT_URL": self.url, **CREDENTIALS}

    def start(self, attempts: int = 3) -> LocalS3Server:
        for _ in range(attempts):  # the free port can be taken between the probe and the bind
            with socket.socket() as probe:  # a port the OS just handed out is very likely free
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CREDENTIALS})
            self.url = f"http://127.0.0.1:{port}"
            if self._wait_ready(30.0):
                return self
            self.stop()
        raise RuntimeError(f"moto_server did not start; see {self.log_path}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2):
                    return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)
        self._proc = None

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def upload(self, local_dir: str | Path, bucket: str, prefix: str) -> str:
        """Copy every file under ``local_dir`` to ``s3://bucket/prefix/...``; returns that URL."""
        client = self.client()
        if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=bucket)
        root = Path(local_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def gets(self) -> Counter[str]:
        """Successful GETs so far, by ``bucket/key`` (from the server's access log)."""
        return Counter(m[1] for m in _GET.finditer(self.log_path.read_text(errors="replace")))
