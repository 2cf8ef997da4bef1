"""Chat completions (and completions) through the ``openai`` client, with our own explicit retry loop.

Works with anything that speaks the OpenAI chat API: OpenAI, vLLM, llama.cpp's server, Ollama.
The client's own retries are switched off (``max_retries=0``) so the policy is in one place here:
HTTP 408, 409, 429, 5xx, timeouts and dropped connections are retried up to ``max_retries`` times
after ``min(backoff_base * 2**n, backoff_max) * U(0.5, 1)`` seconds (exponential backoff with
jitter), or after the server's Retry-After when it sends one (capped at ``backoff_max``). Other
HTTP errors fail the request at once, and 401/403/404 (wrong key, URL or model) stop the run.
Each request has a ``timeout`` in seconds for the whole request (connect, headers and body; see
persona_tune/net.py), so a server that trickles its answer cannot hold it longer. At most ``concurrency``
requests are in flight. Error text is scrubbed of the API key and of any password in the URL before it
goes anywhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass

from persona_tune.distill.store import Answer
from persona_tune.errors import LLMError
from persona_tune.net import DeadlineExceeded, await_with_deadline, redact

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 429}


@dataclass(frozen=True)
class ClientSettings:
    base_url: str | None
    model: str
    api_key: str
    timeout: float = 120.0
    max_retries: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    concurrency: int = 8


class EndpointError(LLMError):
    """The endpoint refuses every request (HTTP 401, 403, 404): stop the run, not just one user."""


class UnsupportedParameter(LLMError):
    """The server refused a request parameter (HTTP 400/422), e.g. an unsupported response_format."""


class ChatClient:
    def __init__(self, settings: ClientSettings, rng: random.Random | None = None):
        self.settings = settings
        import openai  # here, not at module level: the offline backend never pays for the import

        self._openai = openai
        self._client = openai.AsyncOpenAI(
            api_key=settings.api_key, base_url=settings.base_url, timeout=settings.timeout, max_retries=0
        )
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._rng = rng or random.Random()
        self.transport_errors = 0
        self._fatal: EndpointError | None = None
        self.url = redact(settings.base_url)  # the endpoint as error lines name it

    def _scrub(self, text: str) -> str:
        key = self.settings.api_key
        return redact(text.replace(key, "***") if key else text)

    def _delay(self, error: Exception, retry: int) -> float:
        response = getattr(error, "response", None)
        if response is not None:
            header = response.headers.get("retry-after")
            try:
                if header is not None:
                    return min(max(float(header), 0.0), self.settings.backoff_max)
            except ValueError:
                pass
        backoff = min(self.settings.backoff_base * 2**retry, self.settings.backoff_max)
        return backoff * self._rng.uniform(0.5, 1.0)

    async def chat(self, messages: list[dict], params: dict) -> Answer:
        """One chat completion; ``params`` are passed to ``chat.completions.create`` as keywords."""
        params = dict(params)
        if "response_format" in params:
            # Sent as-is: the client's type-driven transform of a large JSON schema costs more than the
            # whole HTTP round trip to a local server.
            params["extra_body"] = {**params.get("extra_body", {}), "response_format": params.pop("response_format")}
        response, latency, retries = await self._send(
            lambda: self._client.chat.completions.create(model=self.settings.model, messages=messages, **params),
            "chat completion", "chat-completions", "response_format" if "response_format" in params.get("extra_body", {}) else None)
        choice = response.choices[0] if response.choices else None
        usage = response.usage
        return Answer(
            content=choice.message.content if choice is not None else None,
            finish_reason=choice.finish_reason if choice is not None else None,
            prompt_tokens=int(usage.prompt_tokens or 0) if usage else 0,
            completion_tokens=int(usage.completion_tokens or 0) if usage else 0,
            latency_s=latency,
            transport_retries=retries,
        )

    async def complete(self, prompt: list[int] | str, params: dict, model: str | None = None):
        """One (legacy) completion: ``(response, latency_s, transport_retries)``; ``params`` go to
        ``completions.create`` as keywords, ``model`` defaults to the settings' model."""
        return await self._send(
            lambda: self._client.completions.create(model=model or self.settings.model, prompt=prompt, **params),
            "completion", "completions", "'prompt'" if isinstance(prompt, list) else None)

    async def _send(self, create, what_call: str, endpoint: str, refusable: str | None = None):
        """``create()`` under the retry policy of the module docstring: (response, latency_s, retries).
        ``refusable``: a parameter that llama_cpp.server refuses with HTTP 500 naming it."""
        retries = 0
        while True:
            started = time.perf_counter()
            try:
                async with self._slots:
                    if self._fatal is not None:  # the endpoint refused another request: send no more
                        raise self._fatal
                    started = time.perf_counter()
                    response = await await_with_deadline(create(), self.settings.timeout, f"{what_call} from {self.url}")
            except (DeadlineExceeded, self._openai.APITimeoutError, self._openai.APIConnectionError, self._openai.APIStatusError,
                    json.JSONDecodeError) as e:  # a 200 whose body is not JSON (e.g. truncated)
                status = getattr(e, "status_code", None)
                what = (f"HTTP {status}" if status is not None else "a body that is not JSON" if isinstance(e, json.JSONDecodeError)
                        else f"no complete answer within {self.settings.timeout:g} s" if isinstance(e, DeadlineExceeded)
                        else "no connection" if isinstance(e, self._openai.APIConnectionError) else type(e).__name__)
                message = self._scrub(str(e))
                # A refused parameter: 400/422 from most servers, 500 naming it from llama_cpp.server.
                if status in (400, 422) or (status is not None and refusable and refusable in message):
                    raise UnsupportedParameter(f"{what} from {self.url}: {message}") from None
                if status in (401, 403, 404):
                    self._fatal = EndpointError(f"{what} from {self.url} (check the URL, --model "
                                                f"and the key in --api-key-env): {message}")
                    raise self._fatal from None
                retryable = status is None or status in RETRY_STATUS or status >= 500
                if not retryable:
                    raise LLMError(f"{what} from {self.url}: {message}") from None
                self.transport_errors += 1
                if retries >= self.settings.max_retries:
                    raise LLMError(
                        f"{what} from {self.url}, still failing after {retries} retries: {message}"
                    ) from None
                delay = self._delay(e, retries)
                log.debug("%s; retry %d in %.2fs", what, retries + 1, delay)
                retries += 1
                await asyncio.sleep(delay)
                continue
            latency = time.perf_counter() - started
            if not isinstance(getattr(response, "choices", None), list):
                body = self._scrub(str(response.model_dump() if hasattr(response, "model_dump") else response))[:200]
                self._fatal = EndpointError(f"{self.url} answered without `choices`: not an OpenAI "
                                            f"{endpoint} endpoint (check --base-url; it usually ends in /v1): {body}")
                raise self._fatal
            return response, latency, retries

    async def close(self) -> None:
        await self._client.close()
