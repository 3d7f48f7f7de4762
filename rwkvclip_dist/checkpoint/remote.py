"""Checkpoints kept in an object store (``checkpoint.remote: s3://bucket/prefix``), never half-copied.

A cluster's scratch disk is not a safe home for the only copy of a run. After a checkpoint is
complete locally (every file written, its manifest and completion marker, ``latest``), rank 0 hands
it to a background thread that copies it to the object store while training goes on:

    s3://bucket/prefix/step_00000400/<every file of the manifest>   largest first
    s3://bucket/prefix/step_00000400/manifest.json
    s3://bucket/prefix/step_00000400/client_state.pt                the marker, last of the tag
    s3://bucket/prefix/latest                                        last of all

An upload cut off anywhere leaves a remote copy without its marker, or with objects of the wrong
size: such a copy is never used, and when it is passed over the reason is logged. Remote copies
older than the newest ``keep_last`` complete ones are deleted after a newer one is complete. A
newer checkpoint that completes while an upload runs waits for it; one waiting is replaced by a newer
one (only the newest matters), and the local copy of a checkpoint in flight is not pruned.

When the local checkpoint directory has no complete checkpoint (a new node, a wiped scratch disk),
the newest complete remote copy is downloaded into it (``<tag>.download``, renamed once every file
matches the manifest) and the run resumes from it.

The endpoint and credentials are the data side's: ``S3_ENDPOINT_URL`` (any S3-compatible server) and
boto3's usual ``AWS_*`` variables.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from rwkvclip_dist.checkpoint.integrity import MANIFEST_FILE, TAG_PATTERN, CheckpointError, verify

log = logging.getLogger(__name__)
LATEST = "latest"


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> ``(bucket, prefix)`` (prefix without slashes at either end)."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise ValueError(f"must be s3://bucket[/prefix], got {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


def check_url(field: str, url: str) -> None:
    """A recipe's ``checkpoint.remote``: empty, or a valid ``s3://`` URL (:class:`FieldError` otherwise)."""
    from rwkvclip_dist.typed_config import FieldError

    if url:
        try:
            parse_url(url)
        except ValueError as err:
            raise FieldError(field, str(err)) from None


def open_remote(url: str, keep_last: int, marker: str) -> Uploader:
    """Rank 0's link to the remote copies: uploads in the background, restores on demand."""
    return Uploader(RemoteCheckpoints(url, marker), keep_last)


class RemoteCheckpoints:
    """One run's checkpoints under ``s3://bucket/prefix``; ``marker`` is the file that completes a tag."""

    def __init__(self, url: str, marker: str) -> None:
        self.url, self.marker = url.rstrip("/"), marker
        self.bucket, self.prefix = parse_url(url)
        self._local = threading.local()

    def _client(self):
        # One client per thread: the uploader thread and the main thread never share one.
        client = getattr(self._local, "client", None)
        if client is None:
            import boto3

            client = boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None)
            self._local.client = client
        return client

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    # -- upload --------------------------------------------------------------------------------
    def upload(self, tag_dir: Path) -> int:
        """Copy a complete local checkpoint; the marker after its files, ``latest`` last. Returns bytes sent."""
        files = json.loads((tag_dir / MANIFEST_FILE).read_text())["files"]
        client, tag, sent = self._client(), tag_dir.name, 0
        for rel in sorted(files, key=lambda name: -files[name]):
            client.upload_file(str(tag_dir / rel), self.bucket, self._key(tag, rel))
            sent += files[rel]
        for rel in (MANIFEST_FILE, self.marker):
            client.upload_file(str(tag_dir / rel), self.bucket, self._key(tag, rel))
            sent += (tag_dir / rel).stat().st_size
        client.put_object(Bucket=self.bucket, Key=self._key(LATEST), Body=(tag + "\n").encode())
        return sent

    # -- what is there -------------------------------------------------------------------------
    def _objects(self, tag: str) -> dict[str, int]:
        paginator = self._client().get_paginator("list_objects_v2")
        found = {}
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(tag) + "/"):
            for item in page.get("Contents", []):
                found[item["Key"][len(self._key(tag)) + 1:]] = int(item["Size"])
        return found

    def tags(self) -> list[str]:
        """Every tag with at least one object, oldest first."""
        paginator = self._client().get_paginator("list_objects_v2")
        base = self._key() + "/" if self.prefix else ""
        names = set()
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"][len(base):].rstrip("/")
                if TAG_PATTERN.match(name):
                    names.add(name)
        return sorted(names)

    def problem(self, tag: str) -> str | None:
        """Why the remote copy of ``tag`` must not be used (None: complete and of the recorded sizes)."""
        objects = self._objects(tag)
        if self.marker not in objects:
            return f"it has no completion marker ({self.marker}): its upload did not finish"
        if MANIFEST_FILE not in objects:
            return f"it has no {MANIFEST_FILE}"
        body = self._client().get_object(Bucket=self.bucket, Key=self._key(tag, MANIFEST_FILE))["Body"].read()
        try:
            files = json.loads(body)["files"]
        except (ValueError, KeyError, TypeError) as err:
            return f"its {MANIFEST_FILE} is unreadable ({err})"
        for rel, size in files.items():
            if rel not in objects:
                return f"{rel} is missing"
            if objects[rel] != size:
                return f"{rel} has {objects[rel]} bytes, the manifest says {size}"
        return None

    def newest_complete(self, quiet: bool = False) -> str | None:
        """The newest remote tag that is complete; every newer one passed over is logged with its reason
        (unless ``quiet``)."""
        for tag in reversed(self.tags()):
            problem = self.problem(tag)
            if problem is None:
                return tag
            if not quiet:
                log.warning("remote checkpoint %s/%s is not used: %s", self.url, tag, problem)
        return None

    def newest_marker(self) -> tuple[str, bytes] | None:
        """``(url of the copy, its marker's bytes)`` of the copy a restore would download, read without
        downloading it (the checks before any engine is built); None when there is none."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            tag = self.newest_complete(quiet=True)  # the restore that follows says why it passes any over
            if tag is None:
                return None
            body = self._client().get_object(Bucket=self.bucket, Key=self._key(tag, self.marker))["Body"].read()
        except (OSError, Boto3Error, BotoCoreError, ClientError) as err:
            raise CheckpointError(f"checkpoint.remote {self.url}: cannot read its checkpoints to check them before "
                                  f"resuming ({type(err).__name__}: {err})") from None
        return f"{self.url}/{tag}", body

    # -- download ------------------------------------------------------------------------------
    def restore(self, directory: Path, write_text: Callable[[Path, str], None]) -> str | None:
        """Download the newest complete remote copy into ``directory`` and name it in ``latest``
        (through the manager's atomic ``write_text``); returns its tag (None when there is none)."""
        tag = self.newest_complete()
        if tag is None:
            return None
        partial = directory / f"{tag}.download"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        client = self._client()
        for rel in self._objects(tag):
            target = partial / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(self.bucket, self._key(tag, rel), str(target))
        problems = verify(partial)
        if problems:
            raise CheckpointError(f"the download of {self.url}/{tag} into {partial} does not match its manifest: "
                                  f"{'; '.join(problems)}")
        final = directory / tag
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        write_text(directory / LATEST, tag + "\n")
        log.info("downloaded checkpoint %s/%s into %s (the local directory had no complete checkpoint)",
                 self.url, tag, final)
        return tag

    def try_restore(self, directory: Path, write_text: Callable[[Path, str], None]) -> str | None:
        """:meth:`restore`, with any failure as one line (None: restored, or nothing to restore)."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.restore(directory, write_text)
        except (CheckpointError, OSError, Boto3Error, BotoCoreError, ClientError) as err:
            return (f"{directory} has no complete checkpoint and restoring one from {self.url} failed: "
                    f"{type(err).__name__}: {err}")
        return None

    # -- prune ---------------------------------------------------------------------------------
    def prune(self, keep_last: int) -> list[str]:
        """Delete remote copies older than the newest ``keep_last`` complete ones; returns their tags."""
        tags = self.tags()
        complete = [tag for tag in tags if self.problem(tag) is None]
        if len(complete) <= keep_last:
            return []
        oldest_kept = complete[-keep_last]
        doomed = [tag for tag in tags if tag < oldest_kept]
        client = self._client()
        for tag in doomed:
            keys = [{"Key": self._key(tag, rel)} for rel in self._objects(tag)]
            # The marker first: a prune cut off half-way leaves an incomplete copy, never a wrong one.
            keys.sort(key=lambda item: not item["Key"].endswith("/" + self.marker))
            for start in range(0, len(keys), 1000):
                client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[start:start + 1000]})
        return doomed


class Uploader:
    """Rank 0's background thread: uploads the newest submitted checkpoint, then prunes remotely."""

    def __init__(self, remote: RemoteCheckpoints, keep_last: int) -> None:
        self.remote, self.keep_last = remote, keep_last
        self._lock = threading.Condition()
        self._pending: Path | None = None
        self._busy: Path | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, tag_dir: Path) -> None:
        with self._lock:
            if self._pending is not None:
                log.warning("checkpoint %s was not uploaded: %s is newer and the upload of %s is still running",
                            self._pending.name, tag_dir.name, self._busy.name if self._busy else "another")
            self._pending = tag_dir
            self._lock.notify_all()

    def in_flight(self) -> set[str]:
        """Tags whose local copy the upload still reads."""
        with self._lock:
            return {p.name for p in (self._pending, self._busy) if p is not None}

    def try_restore(self, directory: Path, write_text: Callable[[Path, str], None]) -> tuple[None, str] | None:
        """Restore the newest complete remote copy into ``directory``: ``(None, reason)`` if that failed."""
        error = self.remote.try_restore(directory, write_text)
        return (None, error) if error else None

    def close(self) -> None:
        """Wait for the uploads in flight, then stop the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._closing:
                    self._lock.wait()
                if self._pending is None:
                    return
                self._busy, self._pending = self._pending, None
            tag_dir = self._busy
            from boto3.exceptions import Boto3Error
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                sent = self.remote.upload(tag_dir)
                pruned = self.remote.prune(self.keep_last)
                log.info("uploaded checkpoint %s to %s/%s (%.1f MB)%s", tag_dir.name, self.remote.url, tag_dir.name,
                         sent / 2**20, f"; pruned remote {', '.join(pruned)}" if pruned else "")
            except (OSError, ValueError, KeyError, Boto3Error, BotoCoreError, ClientError) as err:
                # The store failed, not the run: training goes on and says so.
                log.warning("upload of checkpoint %s to %s failed (%s: %s); the local copy is intact and the next "
                            "checkpoint's upload tries again", tag_dir.name, self.remote.url, type(err).__name__, err)
            with self._lock:
                self._busy = None
                self._lock.notify_all()
