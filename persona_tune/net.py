"""Network requests: one total deadline per request, and no secret in what is recorded or logged.

Client libraries (``openai``/``httpx``, ``urllib``) apply a timeout to each read, so a server that
trickles one byte every half second keeps a request alive for ever. Every request persona-tune makes
goes through one of these, which bound the whole request (connect, headers and body):

- ``await_with_deadline(coro, seconds, what)``: an async request, cancelled at the deadline.
- ``call_with_deadline(fn, seconds, what)``: a blocking request, run in a watchdog-timed daemon thread;
  the caller gets ``DeadlineExceeded`` at the deadline (the abandoned thread ends at the client's own
  per-read timeout, which is set to the same number of seconds).
- ``Deadline``: the remaining time of a loop of reads (the dataset download).

``redact(value)`` replaces the credentials of ``scheme://user:password@host`` with ``***`` in a string,
or in every string of a dict/list/tuple; the manifest (``RunFolder.record_stage``), error lines and log
records go through it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")

# scheme://userinfo@ : userinfo is everything up to the '@' that ends the authority (no '/', space, '@').
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@?#]+)@")


class DeadlineExceeded(TimeoutError):
    """A request did not complete (connect, headers and whole body) within its deadline."""


def redact(value: Any) -> Any:
    """``value`` with the userinfo of every URL in it replaced by ``***`` (recursing into dicts,
    lists and tuples; other types are returned unchanged)."""
    if isinstance(value, str):
        return _USERINFO.sub(r"\g<scheme>***@", value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


class Deadline:
    """``seconds`` from now. ``remaining()`` raises DeadlineExceeded once it has passed."""

    def __init__(self, seconds: float, what: str = "request"):
        self.seconds = float(seconds)
        self.what = what
        self.end = time.monotonic() + self.seconds

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"{redact(self.what)}: no complete answer within {self.seconds:g} s")
        return left


async def await_with_deadline(awaitable: Awaitable[T], seconds: float, what: str = "request") -> T:
    """``await awaitable``, cancelled with DeadlineExceeded after ``seconds`` in total."""
    try:
        return await asyncio.wait_for(awaitable, timeout=seconds)
    except asyncio.TimeoutError:
        raise DeadlineExceeded(f"{redact(what)}: no complete answer within {seconds:g} s") from None


def call_with_deadline(fn: Callable[[], T], seconds: float, what: str = "request") -> T:
    """``fn()`` in a daemon thread; its result or exception, or DeadlineExceeded after ``seconds``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    worker = threading.Thread(target=target, name=f"deadline:{what}"[:60], daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise DeadlineExceeded(f"{redact(what)}: no complete answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["result"]


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URL credentials from each record's formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add a RedactingFilter to every handler of ``logger`` (the root logger by default)."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
