"""Stand-in chat-completions server for the description and caption tests (a helper, not a test file).

A real HTTP server on 127.0.0.1 that stands in for vLLM (`vllm serve`), which needs a GPU and model
weights and cannot run here. It speaks the same OpenAI protocol (GET /v1/models, POST
/v1/chat/completions), answers by restating the sample's caption, and lets a test inject faults per
sample key: HTTP 500/429, hangs past the client's timeout, malformed JSON, dropped connections, and
bad answers for the quality gates.

Requests with an image part (the caption and tag steps, as vLLM serves vision-language models) are
answered from ``vision_answers``: the server decodes the base64 data URL, finds the sample key by the
SHA-256 of the bytes (``images``), keeps the bytes it received (``received_images``) and rejects a
request whose image it does not know with HTTP 400, as a real server rejects an undecodable one.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import threading
from collections import Counter, defaultdict

from aiohttp import web

_KEY = re.compile(r"key=(\w+)")
_CAPTION = re.compile(r"^Caption: (.*)$", re.MULTILINE)

# Answers injected per fault name; each one must trip exactly one gate in quality.py.
BAD_ANSWERS = {
    "refusal": ("I'm sorry, but I can't help with describing this image.", "stop"),
    "empty": ("   ", "stop"),
    "long": ("a very detailed photograph " * 40, "stop"),
    "cut": ("A photo of two dogs that goes on and on", "length"),
    "contradict": ("A photo of seven purple giraffes beside a bus.", "stop"),
    "url": ("A photo of a dog, see www.example.com for more.", "stop"),
}


class ChatServer:
    def __init__(
        self,
        models: tuple[str, ...] = ("test-model",),
        api_key: str | None = None,
        delay_s: float = 0.0,
        hang_s: float = 2.0,
        list_models: bool = True,
    ) -> None:
        self.models = models
        self.api_key = api_key
        self.delay_s = delay_s
        self.hang_s = hang_s
        self.list_models = list_models
        self.faults: dict[str, list[str]] = {}
        """key -> fault names consumed one per request; an empty list means answer normally."""
        self.requests: Counter[str] = Counter()
        self.temperatures: dict[str, list[float]] = defaultdict(list)
        self.auth_headers: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.url = ""
        self.images: dict[str, str] = {}
        """SHA-256 hex of image bytes -> sample key, for requests with an image part."""
        self.vision_answers: dict[str, str] = {}
        """sample key -> the answer to its image request."""
        self.received_images: dict[str, bytes] = {}
        self.instructions: list[str] = []

    def start(self) -> ChatServer:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._open())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("test chat server did not start within 10 s")
        return self

    async def _open(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization")
        self.auth_headers.append(header)
        return self.api_key is None or header == f"Bearer {self.api_key}"

    async def _models(self, request: web.Request) -> web.Response:
        if not self.list_models:
            raise web.HTTPNotFound()
        if not self._authorised(request):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        body = await request.json()
        if body.get("model") not in self.models:
            return web.json_response(
                {"error": {"message": f"The model `{body.get('model')}` does not exist.", "code": 404}}, status=404
            )
        content = body["messages"][-1]["content"]
        if isinstance(content, list):
            key, answer = self._vision(content)
            if key is None:
                return web.json_response({"error": {"message": answer, "code": 400}}, status=400)
        else:
            key = _KEY.search(content)[1]
            answer = f"A photo of {_CAPTION.search(content)[1]}."
        self.requests[key] += 1
        self.temperatures[key].append(body.get("temperature"))
        pending = self.faults.get(key)
        fault = pending.pop(0) if pending else "ok"
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.hang_s if fault == "timeout" else self.delay_s)
            return self._reply(request, fault, answer)
        finally:
            self.in_flight -= 1

    def _vision(self, content: list[dict]) -> tuple[str | None, str]:
        """(key, answer) of an image request, or (None, error message)."""
        urls = [part["image_url"]["url"] for part in content if part.get("type") == "image_url"]
        self.instructions += [part["text"] for part in content if part.get("type") == "text"]
        match = re.fullmatch(r"data:image/(jpeg|png|gif|webp);base64,(.+)", urls[0] if len(urls) == 1 else "")
        if match is None:
            return None, "expected one image_url part with a base64 data URL"
        data = base64.b64decode(match[2], validate=True)
        key = self.images.get(hashlib.sha256(data).hexdigest())
        if key is None:
            return None, "cannot decode the image"
        self.received_images[key] = data
        return key, self.vision_answers[key]

    def _reply(self, request: web.Request, fault: str, answer: str) -> web.StreamResponse:
        if fault in ("500", "503"):
            return web.Response(status=int(fault), text="engine overloaded")
        if fault == "429":
            return web.Response(status=429, text="rate limited", headers={"Retry-After": "0"})
        if fault == "malformed":
            return web.Response(status=200, text='{"choices": [{"message": ', content_type="application/json")
        if fault == "drop":
            request.transport.close()
            return web.Response(status=200, text="")
        text, finish = BAD_ANSWERS.get(fault, (answer, "stop"))
        return web.Response(
            text=json.dumps({
                "id": "cmpl-test", "object": "chat.completion", "model": self.models[0],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            }),
            content_type="application/json",
        )  # fmt: skip
