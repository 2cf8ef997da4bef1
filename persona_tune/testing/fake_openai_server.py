"""A small OpenAI-compatible server for tests and benchmarks, with fault injection.

Speaks ``POST /v1/chat/completions``, ``POST /v1/embeddings`` and ``GET /v1/models`` on loopback
(stdlib ``ThreadingHTTPServer``, HTTP/1.1 keep-alive), plus ``GET /stats`` and ``POST /control``.

* Chat: a request shaped like a distillation step (items listed as ``item_id N | rating R | title |``,
  or fixed by the JSON schema in ``response_format``) gets a valid answer: an explanation per item
  ("I rated <title> as <r> because ...") and a profile. Anything else gets a short text reply.
* Embeddings: deterministic unit vectors from a hash of each text (``float`` or ``base64``).
* Faults, each at its own rate, decided from a hash of (seed, request, how many times this same
  request was seen), so a run's fault pattern is reproducible: HTTP 429, HTTP 500, timeouts (sleep,
  then drop the connection), and for chat also malformed JSON, overlong (> ``overlong_words``) and
  empty output.
* Counting: per request key (sha256 of the canonical JSON body) the number of times it was received
  and answered, so tests can assert that no answered call was repeated.
* ``hold_after=N``: once N requests have been let through to an answer, later ones block until
  ``release()`` and are then dropped unanswered; a test can kill a client at a known point. The cap
  counts requests admitted, not answers sent, so concurrent requests cannot overshoot it.

Run it standalone: ``python -m persona_tune.testing.fake_openai_server --port 8765 --rate-429 0.1``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

ITEM_LINE = re.compile(r"item_id (\d+) \| rating (\d) \| ([^|\n]*?) \|")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default listen backlog (5) drops connections when 32 clients connect at once

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hung up: not news
            super().handle_error(request, client_address)


@dataclass
class Faults:
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    rate_malformed: float = 0.0
    rate_overlong: float = 0.0
    rate_empty: float = 0.0
    timeout_sleep: float = 2.0  # a "timeout" sleeps this long, then drops the connection
    retry_after: float | None = None  # seconds, sent as Retry-After with 429s
    overlong_words: int = 2500
    latency: float = 0.0  # seconds before every answer
    seed: int = 0
    hold_after: int | None = None
    refuse_formats: str = ""  # comma-separated response_format types answered with HTTP 400
    require_key: str = ""  # if set, other keys get HTTP 401 (whose message echoes the key, as OpenAI's does)

    def update(self, **changes) -> None:
        names = {f.name for f in fields(self)}
        for k, v in changes.items():
            if k not in names:
                raise ValueError(f"unknown fault setting {k!r}")
            setattr(self, k, v)


def request_key(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _unit(*parts: object) -> float:
    digest = hashlib.sha256("|".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def embed_text(text: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def batch_items(body: dict) -> list[tuple[int, int, str]]:
    """(item_id, rating, title) of a distillation step, from the schema or the prompt text."""
    fmt = body.get("response_format") or {}
    schema = fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema")
    text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []) if m.get("role") == "user")
    titles = {int(i): t.strip() for i, _, t in ITEM_LINE.findall(text)}
    if schema:
        try:
            entries = schema["properties"]["explanations"]["prefixItems"]
            out = []
            for e in entries:
                item_id = int(e["properties"]["item_id"]["enum"][0])
                out.append((item_id, int(e["properties"]["rating"]["enum"][0]), titles.get(item_id, f"movie {item_id}")))
            return out
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    return [(int(i), int(r), t.strip()) for i, r, t in ITEM_LINE.findall(text)]


def distill_answer(items: list[tuple[int, int, str]]) -> str:
    explanations = [
        {"item_id": i, "rating": r, "explanation": f"I rated {t} as {r} because "
         + ("it is the kind of movie I love." if r >= 4 else "it did not work for me." if r <= 2 else "it was fine, nothing more.")}
        for i, r, t in items
    ]
    liked = [t for _, r, t in items if r >= 4] or ["nothing in particular"]
    profile = f"I enjoy movies like {', '.join(liked[:3])}, and I rate with care."
    return json.dumps({"explanations": explanations, "profile": profile})


def chat_completion(body: dict, outcome: str = "ok", model: str = "fake-model", overlong_words: int = 2500) -> dict:
    """The chat-completion body the server answers ``body`` with (also the Batch runner's answer)."""
    if outcome == "malformed":
        content = '{"explanations": [{"item_id": 1, "explanation": "I rated'
    elif outcome == "overlong":
        content = " ".join(["word"] * overlong_words)
    elif outcome == "empty":
        content = ""
    else:
        items = batch_items(body)
        content = distill_answer(items) if items else "OK"
    prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
    return {
        "id": "chatcmpl-" + request_key(body)[:12], "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model", model),
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": len(content) // 4,
                  "total_tokens": prompt_chars // 4 + len(content) // 4},
    }


class FakeOpenAIServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, faults: Faults | None = None,
                 model: str = "fake-model", embedding_dim: int = 64):
        self.faults = faults or Faults()
        self.model = model
        self.embedding_dim = embedding_dim
        self.received: Counter[str] = Counter()  # request key -> times received
        self.answered: Counter[str] = Counter()  # request key -> times answered with HTTP 200
        self.outcomes: Counter[str] = Counter()
        self.admitted = 0  # requests let through to an answer (what hold_after caps)
        self.auth_seen: set[str] = set()
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._httpd = _Server((host, port), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "FakeOpenAIServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def release(self) -> None:
        """End hold mode: held requests are dropped unanswered, later ones are served."""
        with self._lock:
            self.faults.hold_after = None
        self._release.set()

    def stats(self) -> dict:
        with self._lock:
            return {
                "requests": sum(self.received.values()),
                "answered": sum(self.answered.values()),
                "distinct": len(self.received),
                "max_received_per_key": max(self.received.values(), default=0),
                "max_answered_per_key": max(self.answered.values(), default=0),
                "outcomes": dict(self.outcomes),
                "faults": asdict(self.faults),
            }

    # ------------------------------------------------------------ request handling

    def _decide(self, key: str, occurrence: int, chat: bool) -> str:
        f = self.faults
        u = _unit(f.seed, key, occurrence)
        kinds = [("429", f.rate_429), ("500", f.rate_500), ("timeout", f.rate_timeout)]
        if chat:
            kinds += [("malformed", f.rate_malformed), ("overlong", f.rate_overlong), ("empty", f.rate_empty)]
        edge = 0.0
        for kind, rate in kinds:
            edge += rate
            if u < edge:
                return kind
        return "ok"

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model", "owned_by": "fake"}]})
                elif self.path.rstrip("/") == "/stats":
                    self._send(200, server.stats())
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    self._send(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
                    return
                if self.path.rstrip("/") == "/control":
                    try:
                        with server._lock:
                            server.faults.update(**body)
                    except ValueError as e:
                        self._send(400, {"error": {"message": str(e)}})
                        return
                    if body.get("hold_after", 0) is None:
                        server._release.set()
                    self._send(200, server.stats())
                    return
                chat = self.path.endswith("/chat/completions")
                if not chat and not self.path.endswith("/embeddings"):
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                fmt = (body.get("response_format") or {}).get("type")
                if chat and fmt and fmt in server.faults.refuse_formats.split(","):
                    with server._lock:
                        server.outcomes["refused_format"] += 1
                    self._send(400, {"error": {"message": f"response_format {fmt} is not supported",
                                               "type": "invalid_request_error"}})
                    return
                auth = self.headers.get("Authorization", "")
                if server.faults.require_key and auth != f"Bearer {server.faults.require_key}":
                    with server._lock:
                        server.outcomes["401"] += 1
                    self._send(401, {"error": {"message": f"Incorrect API key provided: {auth[len('Bearer '):]}",
                                               "type": "invalid_request_error", "code": "invalid_api_key"}})
                    return
                key = request_key(body)
                with server._lock:
                    if auth.startswith("Bearer "):
                        server.auth_seen.add(auth[len("Bearer "):])
                    occurrence = server.received[key]
                    server.received[key] += 1
                    hold = server.faults.hold_after is not None and server.admitted >= server.faults.hold_after
                    outcome = "held" if hold else server._decide(key, occurrence, chat)
                    server.outcomes[outcome] += 1
                    if outcome not in ("held", "timeout", "429", "500"):
                        server.admitted += 1
                if outcome == "held":
                    while not server._release.wait(0.05):
                        pass
                    self.close_connection = True
                    return
                if outcome == "timeout":
                    time.sleep(server.faults.timeout_sleep)
                    self.close_connection = True
                    return
                if outcome == "429":
                    headers = {}
                    if server.faults.retry_after is not None:
                        headers["Retry-After"] = str(server.faults.retry_after)
                    self._send(429, {"error": {"message": "rate limited (injected)", "type": "rate_limit"}}, headers)
                    return
                if outcome == "500":
                    self._send(500, {"error": {"message": "server error (injected)", "type": "server_error"}})
                    return
                if server.faults.latency:
                    time.sleep(server.faults.latency)
                if chat:
                    payload = self._chat(body, outcome)
                else:
                    payload = self._embeddings(body)
                    if payload is None:
                        return
                with server._lock:
                    server.answered[key] += 1
                self._send(200, payload)

            def _chat(self, body: dict, outcome: str) -> dict:
                return chat_completion(body, outcome, server.model, server.faults.overlong_words)

            def _embeddings(self, body: dict) -> dict | None:
                texts = body.get("input")
                if isinstance(texts, str):
                    texts = [texts]
                if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                    self._send(400, {"error": {"message": "input must be a string or a list of strings",
                                               "type": "invalid_request_error"}})
                    return None
                dim = int(body.get("dimensions") or server.embedding_dim)
                data = []
                for i, t in enumerate(texts):
                    v = embed_text(t, dim)
                    value = base64.b64encode(v.astype("<f4").tobytes()).decode() if body.get("encoding_format") == "base64" else v.tolist()
                    data.append({"object": "embedding", "index": i, "embedding": value})
                tokens = sum(len(t) for t in texts) // 4
                return {"object": "list", "data": data, "model": body.get("model", server.model),
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

        return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (printed on start)")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--embedding-dim", type=int, default=64)
    for f in fields(Faults):
        if f.name == "hold_after":
            continue
        kind = {"int": int, "str": str}.get(str(f.type), float)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    args = parser.parse_args(argv)
    faults = Faults(**{f.name: getattr(args, f.name) for f in fields(Faults) if f.name != "hold_after"})
    server = FakeOpenAIServer(args.host, args.port, faults, model=args.model, embedding_dim=args.embedding_dim)
    print(f"listening on {server.url}", flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    main()
