"""Async client for OpenAI-compatible chat-completions servers (vLLM, SGLang, llama.cpp server).

Transient trouble (429, 5xx, timeouts, dropped connections, malformed bodies) is retried with capped
exponential backoff and jitter; what cannot succeed by retrying (unreachable server, wrong model name,
rejected API key) raises :class:`ServerError` so the whole run stops with a clear message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

EARLY_FAILURES = 16
"""Failed attempts, all of one kind and before any success, that stop a run (see ``_note_early_failure``)."""


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    """Server root as OpenAI clients take it, e.g. http://host:8000/v1 ('/v1' is added if absent)."""
    model: str
    """Served model name, exactly as the server's /v1/models lists it."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key; the key itself is never logged."""
    concurrency: int = 64
    """Requests in flight at once (also the connection-pool size)."""
    timeout_s: float = 120.0
    """Wall-clock limit of one request, connection included."""
    max_retries: int = 5
    """Extra attempts per request after a transient failure."""
    backoff_base_s: float = 0.5
    """First backoff delay; doubles per attempt up to backoff_max_s, with jitter."""
    backoff_max_s: float = 30.0
    temperature: float = 0.2
    max_tokens: int = 256
    """Completion cap; an answer cut at this length is rejected as over-long."""

    @property
    def api_root(self) -> str:
        root = self.base_url.rstrip("/")
        return root if root.endswith("/v1") else root + "/v1"


class ServerError(RuntimeError):
    """The server cannot serve this run at all; retrying individual samples would not help."""


class RequestFailed(Exception):
    """One request gave up; ``reason`` is a short tag counted in the run summary."""

    def __init__(self, reason: str, detail: str, attempts: int = 1) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.attempts = attempts


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str | None
    retries: int
    """Transient failures absorbed before this answer arrived."""


class _Retryable(Exception):
    def __init__(self, reason: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class ChatClient:
    """Use as ``async with ChatClient(cfg) as client``; then ``await client.probe()``."""

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self._session: aiohttp.ClientSession | None = None
        headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ServerError(f"--api-key-env {cfg.api_key_env}: that environment variable is empty or unset")
            headers["Authorization"] = f"Bearer {key}"
        self._headers = headers
        self._answered = False
        self._early_failures: Counter[str] = Counter()

    async def __aenter__(self) -> ChatClient:
        connector = aiohttp.TCPConnector(limit=self.cfg.concurrency)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ChatClient used outside 'async with'")
        return self._session

    async def probe(self) -> None:
        """Fail fast on an unreachable server, a rejected key or a model the server does not serve."""
        url = f"{self.cfg.api_root}/models"
        try:
            # A short limit: a black-holed address should fail in seconds, not after --timeout.
            probe_timeout = aiohttp.ClientTimeout(total=min(self.cfg.timeout_s, 30.0))
            async with self.session.get(url, timeout=probe_timeout) as resp:
                body = await resp.text()
                status = resp.status
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as err:
            raise ServerError(
                f"cannot reach the chat-completions server at {self.cfg.api_root} "
                f"({type(err).__name__}: {err}); is it running, and is --base-url right?"
            ) from err
        if status in (401, 403):
            raise ServerError(f"{url} refused the API key (HTTP {status}); check --api-key-env")
        if status == 404:
            # Some servers have no model listing; the first chat request will then check the name.
            log.warning("%s answered 404; cannot check the model name before generating", url)
            return
        if status != 200:
            raise ServerError(f"{url} answered HTTP {status}: {body[:200]}")
        try:
            served = [entry["id"] for entry in json.loads(body)["data"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ServerError(f"{url} did not return an OpenAI model list: {body[:200]}") from err
        if self.cfg.model not in served:
            raise ServerError(
                f"model {self.cfg.model!r} is not served at {self.cfg.api_root}; "
                f"--model must be one of: {', '.join(served) or '(none listed)'}"
            )

    async def complete(self, messages: list[dict[str, Any]], *, temperature: float | None = None) -> ChatResult:
        """One chat completion of ``messages`` (text, or text and image parts as tasks.py builds them)."""
        payload: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature if temperature is None else temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        for attempt in range(self.cfg.max_retries + 1):
            try:
                text, finish = await self._post(payload)
            except _Retryable as err:
                self._note_early_failure(err.reason, err.detail)
                if attempt == self.cfg.max_retries:
                    raise RequestFailed(err.reason, err.detail, attempts=attempt + 1) from err
                await asyncio.sleep(self._backoff(attempt, err.retry_after))
                continue
            except RequestFailed as err:
                self._note_early_failure(err.reason, err.detail)
                raise
            self._answered = True
            return ChatResult(text=text, finish_reason=finish, retries=attempt)
        raise AssertionError("unreachable: the loop returns or raises")

    def _note_early_failure(self, reason: str, detail: str) -> None:
        """Before any request has succeeded, :data:`EARLY_FAILURES` attempts failing the same way mean
        the server answers but cannot serve this run (not an OpenAI-compatible endpoint, a model that
        rejects the requests): stop now, not after retrying every sample."""
        if self._answered:
            return
        self._early_failures[reason] += 1
        if len(self._early_failures) == 1 and self._early_failures[reason] >= EARLY_FAILURES:
            raise ServerError(
                f"{self.cfg.api_root}: the first {EARLY_FAILURES} requests all failed with {reason} ({detail[:120]}) "
                f"and none succeeded; is it an OpenAI-compatible chat-completions server, and is --base-url right?"
            )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2**attempt)
        # Half fixed, half random: spreads a burst of 429s apart without ever retrying instantly.
        delay = cap / 2 + random.uniform(0, cap / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cfg.backoff_max_s))
        return delay

    async def _post(self, payload: dict[str, Any]) -> tuple[str, str | None]:
        url = f"{self.cfg.api_root}/chat/completions"
        try:
            async with self.session.post(url, json=payload) as resp:
                status = resp.status
                body = await resp.text()
                retry_after = _seconds(resp.headers.get("Retry-After"))
        except asyncio.TimeoutError as err:
            raise _Retryable("timeout", f"no answer within {self.cfg.timeout_s}s") from err
        except aiohttp.ClientConnectionError as err:
            raise _Retryable("connection", f"{type(err).__name__}: {err}") from err
        except aiohttp.ClientPayloadError as err:
            raise _Retryable("malformed_response", f"broken response body: {err}") from err
        except aiohttp.ClientError as err:
            # Anything else the HTTP layer rejects (bad status line, broken headers) is as transient
            # as a dropped connection when a proxy or an overloaded server garbles one answer.
            raise _Retryable("http_protocol", f"{type(err).__name__}: {err}") from err
        if status == 429 or status >= 500:
            raise _Retryable(f"http_{status}", body[:200], retry_after)
        if status in (401, 403):
            raise ServerError(f"{url} refused the API key (HTTP {status}); check --api-key-env")
        if status == 404:
            if "model" in body.lower():
                raise ServerError(f"{url}: the server does not know model {self.cfg.model!r}: {body[:200]}")
            raise ServerError(f"{url} answered 404: no chat-completions endpoint there; check --base-url")
        if status != 200:
            raise RequestFailed(f"http_{status}", body[:200])
        return _parse_choice(body)


def _parse_choice(body: str) -> tuple[str, str | None]:
    try:
        choice = json.loads(body)["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise _Retryable("malformed_response", f"not a chat completion: {body[:120]!r}") from err
    if content is not None and not isinstance(content, str):
        raise _Retryable("malformed_response", f"message content is {type(content).__name__}, not text")
    return content or "", choice.get("finish_reason")


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP-date Retry-After; the exponential backoff covers it
