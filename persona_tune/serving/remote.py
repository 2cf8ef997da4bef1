"""The remote rater: an agent's ratings from a served model (vLLM, llama.cpp's server, any
OpenAI-compatible completions endpoint), equal to the local path's.

The engine serves the bundle of `persona-tune serve-export` (docs/serving.md): the base model and
each persona's adapter under its name in ``serving.json``. For each row the rater

1. builds the same prompt tokens as the local path (persona_tune.prompts, the tokenizer, cut at the
   answer) and sends them to ``/completions`` as token ids (the OpenAI API's own form) with
   ``max_tokens=1, temperature=0, logprobs=top_logprobs``; a server that takes text only
   (llama_cpp.server refuses them) gets the tokens' exact text, and every answer's
   ``usage.prompt_tokens`` must equal the token count, else the run stops naming the URL;
2. reads the five rating tokens' log-probabilities from the answer's top log-probabilities, keyed by
   ``token_id:N`` where the server does that (vLLM, asked with ``return_tokens_as_token_ids``) or by
   the tokens' texts (llama.cpp) when no other token shares the text (``rating_texts_shared``). A
   rating token outside the top ones, or behind a shared text, is asked for alone: the same request
   with ``logit_bias`` +100 on that token, whose sampled-token log-probability is the token's own
   before the bias (vLLM's default raw log-probabilities; llama.cpp's);
3. adds the rating head's terms the engine cannot (``bias + prior_weight @ stated numbers``,
   persona_tune.serving.export.head_terms) and renormalises over the five: p1..p5, the expected
   rating, and the mass of the five among all tokens, as the local scorer reports them.

Requests go through distill's client (persona_tune.distill.client: concurrency, retries with
backoff, a total deadline per request) and every answer is kept in a request store
(persona_tune.distill.store, SQLite, keyed by model, adapter checksum, prompt tokens and
parameters), so a stopped run resumes without repeating an answered request.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from persona_tune.errors import ConfigError, LLMError

BACKENDS = ("local", "openai")
REMOTE_GROUP = "openai backend (a served agent: docs/serving.md)"
PINNED_BIAS = 100.0
TEXT_ONLY_HINT = "'prompt'"  # what a server's refusal of token-id prompts names (llama_cpp.server: HTTP 500)


@dataclass
class RemoteOptions:
    """The options of a stage that rates with an agent (eval, simulate): where the agent runs."""

    backend: str = field(default="local", metadata={
        "choices": BACKENDS, "help": "local: this package's own loop; openai: an OpenAI-compatible server that "
                                     "serves the bundle of `persona-tune serve-export` (docs/serving.md)"})
    base_url: str | None = field(default=None, metadata={
        "group": REMOTE_GROUP, "help": "server URL, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL)"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "group": REMOTE_GROUP, "help": "environment variable that holds the API key"})
    concurrency: int = field(default=8, metadata={"min": 1, "group": REMOTE_GROUP, "help": "requests in flight at most"})
    timeout: float = field(default=120.0, metadata={
        "gt": 0, "group": REMOTE_GROUP, "help": "seconds per request, the whole request"})
    max_retries: int = field(default=6, metadata={"group": REMOTE_GROUP, "help": "retries per request on 429/5xx/timeouts"})
    top_logprobs: int = field(default=20, metadata={
        "min": 1, "group": REMOTE_GROUP, "help": "log-probabilities asked per request (vLLM's default limit is 20)"})

    def validate(self) -> None:
        """The rule that ties fields together (persona_tune.stage.validate checks each field's choices and
        range first): a served agent needs an endpoint."""
        if self.backend == "openai" and not endpoint(self):
            raise ConfigError("--backend openai needs --base-url (or $OPENAI_BASE_URL)")

    def remote_dict(self) -> dict:
        return {f: getattr(self, f) for f in REMOTE_FIELDS}


REMOTE_FIELDS = tuple(f.name for f in RemoteOptions.__dataclass_fields__.values())
# Options that change how answers arrive, not which: not part of a result's fingerprint.
TRANSPORT_FIELDS = ("api_key_env", "concurrency", "timeout", "max_retries")


# The real endpoint of a URL whose credentials were redacted in a config file (`eval` writes
# http://***@host there and hands the `tune run` child the real one in this variable).
SECRET_URL_ENV = "PERSONA_TUNE_REMOTE_URL"


def endpoint(options) -> str | None:
    import os

    from persona_tune.net import redact

    url = options.base_url or os.environ.get("OPENAI_BASE_URL") or None
    secret = os.environ.get(SECRET_URL_ENV)
    if url and "***@" in url and secret and redact(secret) == url:
        return secret
    return url


def prompt_text(tokenizer, tokens: Sequence[int]) -> str:
    """The exact text of ``tokens`` (special tokens written out), for servers that take text only."""
    spm = getattr(getattr(tokenizer, "_spm_model", None), "spm_model", None)
    if spm is not None:  # SentencePiece: pieces with their word-boundary marks and byte tokens
        out = bytearray()
        for t in tokens:
            piece = spm.id_to_piece(int(t))
            out += bytes([int(piece[3:5], 16)]) if spm.is_byte(int(t)) else piece.replace("\u2581", " ").encode()
        return out.decode("utf-8", errors="strict")
    return tokenizer.decode(list(tokens), skip_special_tokens=False)


@dataclass
class Logprobs:
    """What one answer says about the next token: top log-probabilities by key, the sampled token."""

    top: dict[str, float]
    token: str
    token_logprob: float
    prompt_tokens: int


class RemoteRater:
    """Scores prompts through a served agent; the local RatingPredictor's ``encode``/``score`` interface.

    ``use(persona)`` selects the persona's adapter (as ``ModelLoader.load`` does locally); ``score``
    reads the stated numbers of the rows from ``row_priors`` (set by predict_rows).
    """

    model = None  # no local model: predict_rows reads ``prior`` (the numbers the current head reads)

    def __init__(self, spec: dict, tokenizer, options: RemoteOptions, cache: str | Path | None = None,
                 max_seq_len: int | None = None):
        from persona_tune.evaluation.engine import answer_tokens
        from persona_tune.evaluation.predict import PredictStats
        from persona_tune.prompts import FitToLength

        self.spec, self.tokenizer, self.options = spec, tokenizer, options
        self.url = endpoint(options)
        self.answer = answer_tokens(tokenizer)
        self.rating_ids = [int(i) for i in spec["rating_token_ids"]]
        if tuple(self.rating_ids) != tuple(self.answer.rating_ids):
            raise ConfigError(f"serving.json's rating tokens {self.rating_ids} are not this tokenizer's "
                              f"{list(self.answer.rating_ids)}: re-run `persona-tune serve-export`")
        from persona_tune.serving import export as ex

        shared = set(spec.get("rating_texts_shared", []))
        self.by_text = {t: r for r, t in enumerate(spec["rating_texts"]) if t not in shared}
        self.entries = {int(e["persona"]): e for e in spec["adapters"]}
        self.terms = {p: ex.HeadTerms.from_json(e["head"]) for p, e in self.entries.items()}
        self._fit = FitToLength(tokenizer, max_seq_len if max_seq_len is not None else getattr(tokenizer, "max_seq_len", None))
        self.cache_path = Path(cache) if cache is not None else None
        self.stats = PredictStats()
        self.requests = {"sent": 0, "cached": 0, "pinned": 0}
        self.prompt_form = "tokens"
        self.persona = None
        self.prior = "none"
        self.row_priors: np.ndarray | None = None

    # ---------------------------------------------------------------- the predictor's interface
    def encode(self, parts_list) -> list[list[int]]:
        from persona_tune.evaluation.engine import encode_prompt

        return [encode_prompt(self._fit, p, self.answer) for p in parts_list]

    def use(self, persona: int) -> dict:
        """Rate with ``persona``'s adapter (or the variant's single adapter)."""
        entry = self.entries.get(int(persona), self.entries.get(-1))
        if entry is None:
            raise ConfigError(f"serving.json has no adapter for persona {persona}: re-run `persona-tune serve-export`")
        self.persona = int(entry["persona"])
        self.prior = self.terms[self.persona].prior
        self.row_priors = None
        return entry

    def generate(self, *args, **kwargs):
        raise ConfigError("the openai backend rates in scoring mode only (the expected rating); use --mode scoring")

    def score(self, prompts: Sequence[Sequence[int]], groups: Sequence | None = None) -> pd.DataFrame:
        """p1..p5, rating_mass, expected_rating and argmax_rating per prompt, with the current persona."""
        from persona_tune.evaluation.engine import scored_frame
        from persona_tune.serving.export import head_terms

        if self.persona is None:
            self.use(-1)
        entry = self.entries[self.persona]
        terms = self.terms[self.persona]
        logprobs = self.logprobs([(entry, [list(map(int, p)) for p in prompts])])[0]
        extra = head_terms(terms, self.row_priors if terms.n_prior else None)
        z = logprobs + (extra if len(extra) == len(prompts) else np.tile(extra[0], (len(prompts), 1)))
        probs = np.exp(z - z.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        # The five tokens' share of all mass after the head: the head moves their logits by `extra` only.
        before = np.exp(logprobs).sum(1)
        after = np.exp(z).sum(1)
        self.stats.rows += len(prompts)
        self.stats.prompt_tokens += sum(map(len, prompts))
        return scored_frame(probs, after / np.maximum(1.0 - before + after, 1e-300))

    # ---------------------------------------------------------------- requests
    def logprobs(self, groups: list[tuple[dict, list[list[int]]]]) -> list[np.ndarray]:
        """The engine's log-probabilities [n, 5] of the rating tokens for each (adapter entry, prompts)
        group, all groups' requests in flight together (up to the concurrency)."""
        from persona_tune.distill.client import ChatClient, ClientSettings
        from persona_tune.distill.llm import resolve_api_key
        from persona_tune.distill.store import RequestStore

        o = self.options
        settings = ClientSettings(base_url=self.url, model=groups[0][0]["model"], api_key=resolve_api_key(o.api_key_env),
                                  timeout=o.timeout, max_retries=o.max_retries, concurrency=o.concurrency)
        store = RequestStore(self.cache_path) if self.cache_path is not None else None
        try:
            known = store.answers() if store is not None else {}

            async def go():
                client = ChatClient(settings, rng=random.Random(0))
                try:
                    return await asyncio.gather(*(self._rate_one(client, store, known, entry, p)
                                                  for entry, prompts in groups for p in prompts))
                finally:
                    await client.close()

            flat = np.array(asyncio.run(go()), dtype=float).reshape(-1, 5)
            ends = np.cumsum([len(prompts) for _, prompts in groups])
            return np.split(flat, ends[:-1])
        finally:
            if store is not None:
                store.close()

    async def _rate_one(self, client, store, known: dict, entry: dict, tokens: list[int]) -> list[float]:
        top = await self._ask(client, store, known, entry, tokens, None)
        values: list[float | None] = [None] * 5
        for key, lp in top.top.items():
            r = self._rating_of(key)
            if r is not None:
                values[r] = float(lp)
        for r in [r for r, v in enumerate(values) if v is None]:
            pinned = await self._ask(client, store, known, entry, tokens, self.rating_ids[r])
            if self._rating_of(pinned.token) != r and pinned.token != self.spec["rating_texts"][r]:
                raise LLMError(f"{client.url}: asked for rating token {self.rating_ids[r]} with a logit bias of "
                               f"{PINNED_BIAS:g}, the server answered {pinned.token!r}: it ignores logit_bias")
            if pinned.token_logprob > math.log(0.5):  # it would have been the top token: the bias is in it
                raise LLMError(f"{client.url} reports log-probabilities after the logit bias; serve raw ones "
                               f"(vLLM: --logprobs-mode raw_logprobs)")
            values[r] = float(pinned.token_logprob)
        return values

    def _rating_of(self, key: str) -> int | None:
        if key.startswith("token_id:"):
            try:
                token = int(key[len("token_id:"):])
            except ValueError:
                return None
            return self.rating_ids.index(token) if token in self.rating_ids else None
        return self.by_text.get(key)

    async def _ask(self, client, store, known: dict, entry: dict, tokens: list[int], pin: int | None) -> Logprobs:
        from persona_tune.distill.client import UnsupportedParameter
        from persona_tune.distill.store import Answer, request_key

        params = {"max_tokens": 1, "temperature": 0.0, "logprobs": 1 if pin is not None else self.options.top_logprobs}
        if pin is not None:
            params["logit_bias"] = {str(pin): PINNED_BIAS}
        identity = {**params, "adapter": (entry.get("source") or {}), "bundle_format": self.spec["format_version"]}
        key = request_key(entry["model"], [{"role": "prompt", "tokens": tokens}], identity)
        cached = known.get(key)
        if cached is not None:
            self.requests["cached"] += 1
            return Logprobs(**json.loads(cached.content))
        while True:
            form = self.prompt_form
            prompt = tokens if form == "tokens" else prompt_text(self.tokenizer, tokens)
            try:
                response, latency, retries = await client.complete(
                    prompt, {**params, "extra_body": {"return_tokens_as_token_ids": True}}, model=entry["model"])
            except UnsupportedParameter as e:
                if form == "tokens" and TEXT_ONLY_HINT in str(e):  # a server that takes text prompts only
                    self.prompt_form = "text"
                    continue
                raise
            break
        answer = self._parse(response, client.url, len(tokens), form)
        self.requests["sent"] += 1
        self.requests["pinned"] += pin is not None
        self.stats.forward_passes += 1
        self.stats.tokens_processed += len(tokens)
        stored = Answer(content=json.dumps(answer.__dict__), finish_reason="logprobs",
                        prompt_tokens=answer.prompt_tokens,
                        completion_tokens=int(getattr(response.usage, "completion_tokens", 0) or 0),
                        latency_s=latency, transport_retries=retries)
        if store is not None:
            store.put(key, model=entry["model"], request={"tokens": len(tokens), "params": identity}, answer=stored)
        known[key] = stored  # the same request again in this run reads this copy
        return answer

    def _parse(self, response, url: str, n_tokens: int, form: str) -> Logprobs:
        try:
            logprobs = response.choices[0].logprobs
            top = dict(logprobs.top_logprobs[0])
            token, token_logprob = logprobs.tokens[0], float(logprobs.token_logprobs[0])
        except (AttributeError, IndexError, TypeError, ValueError):
            raise LLMError(f"{url} answered a completion without log-probabilities: it cannot rate "
                           "(llama.cpp: serve with logits_all; vLLM: --max-logprobs >= --top-logprobs)") from None
        usage = getattr(response, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        if form == "text" and prompt_tokens != n_tokens:
            raise LLMError(f"{url} read the prompt text as {prompt_tokens} tokens, the local tokenizer made "
                           f"{n_tokens}: not the same tokens (serve the base GGUF `persona-tune serve-export` wrote)")
        return Logprobs({str(k): float(v) for k, v in top.items()}, str(token), token_logprob, prompt_tokens)


def remote_rater(eval_cfg, options: RemoteOptions, cache: str | Path | None = None) -> RemoteRater:
    """The remote rater of an eval config's variant: its serve-export bundle, its tokenizer, ``options``."""
    from torchtune import config as tt_config

    from persona_tune.runfolder import RunFolder
    from persona_tune.serving.export import read_serving_spec

    from persona_tune.stage import validate

    validate(options)
    spec = read_serving_spec(RunFolder(eval_cfg.run_dir), str(eval_cfg.variant))
    now = {"memory": str(eval_cfg.memory), "template": str(eval_cfg.get("prompt_template", "paper")),
           "state_numbers": bool(eval_cfg.get("state_numbers", False)),
           "collab_memories": int(eval_cfg.get("collab_memories", 0) or 0)}
    if spec["prompt"] != now:
        raise ConfigError(f"the served bundle of {eval_cfg.variant} was exported with prompts {spec['prompt']}, "
                          f"this run's config makes {now}: re-run `persona-tune serve-export`")
    return RemoteRater(spec, tt_config.instantiate(eval_cfg.tokenizer), options, cache,
                       max_seq_len=eval_cfg.get("max_seq_len"))
