"""The LLM distiller: the paper's hierarchical self-reflection through an OpenAI-compatible endpoint.

Each user's train ratings, in time order, are cut into batches; every step asks the model to revise
the profile (M_s) and explain each rating of the batch (M_l), validates the answer, and retries a
rejected one hotter. Users run concurrently; every answered request is kept in the request store
(RUN/distill/requests.sqlite), so a re-run replays them instead of asking again. The counterpart
of ``offline`` (rule-based, no LLM); ``run`` is the stage that calls either.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from tqdm import tqdm

from persona_tune.distill.client import ChatClient, ClientSettings, EndpointError, UnsupportedParameter
from persona_tune.distill.config import RESPONSE_FORMATS, DistillConfig
from persona_tune.distill.offline import display_title
from persona_tune.distill.reflect import BatchItem, Prompts, load_prompts, step_messages, step_schema, validate_step
from persona_tune.distill.store import RequestStore, request_key
from persona_tune.distill.traits import render_traits_text
from persona_tune.errors import ConfigError, LLMError
from persona_tune.runfolder import DISTILL_REQUESTS, RunFolder

log = logging.getLogger(__name__)

BACKEND = "openai"
RETRY_TEMPERATURE = 0.7  # a retried generation samples at least this hot, with a new seed
# The columns a backend fills (the stage adds backend, model and prompt_version).
PROFILE_FIELDS = ["user_id", "profile", "activity", "conformity", "diversity", "traits_text"]
MEMORY_FIELDS = ["user_id", "item_id", "rating", "timestamp", "explanation"]


def plan_batches(train: pd.DataFrame, items: pd.DataFrame, batch_size: int) -> dict[int, list[list[BatchItem]]]:
    """user_id -> chronological batches of at most ``batch_size`` rated items."""
    info = items.set_index("item_id")
    titles = {i: display_title(t, y) for i, t, y in zip(info.index, info["title"], info["year"])}
    texts = info["text"].fillna("").astype(str).to_dict()
    plan: dict[int, list[list[BatchItem]]] = {}
    entries = [BatchItem(i, r, titles[i], texts[i]) for i, r in zip(train["item_id"].tolist(), train["rating"].tolist())]
    users = train["user_id"].tolist()  # train is sorted by user, then time (load_inputs)
    start = 0
    for end in range(1, len(users) + 1):
        if end == len(users) or users[end] != users[start]:
            rows = entries[start:end]
            plan[users[start]] = [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]
            start = end
    return plan


@dataclass
class Tally:
    calls: int = 0  # requests answered by the server in this run
    cached: int = 0  # answers replayed from the store
    rejected: int = 0  # generations that failed validation
    prompt_tokens: int = 0
    completion_tokens: int = 0
    users_done: int = 0
    users_failed: int = 0
    users_waiting: int = 0  # batch mode: users whose next request is not answered yet


class StepRejected(Exception):
    pass


class Deferred(Exception):
    """The request is not answered yet and is not asked here (batch mode): its user waits."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


@dataclass
class LLMDistiller:
    """Runs the self-reflection chains of many users concurrently against one endpoint."""

    config: DistillConfig
    prompts: Prompts
    store: RequestStore
    client: ChatClient | None
    tally: Tally = field(default_factory=Tally)
    response_format: str = "json_schema"
    known: dict = field(default_factory=dict)  # stored answers, by key
    inflight: dict = field(default_factory=dict)  # key -> future of the request in flight

    def __post_init__(self) -> None:
        self.known = self.store.answers()

    def _params(self, batch: list[BatchItem], attempt: int) -> dict:
        cfg = self.config
        params: dict[str, Any] = {
            "temperature": cfg.temperature if attempt == 0 else max(cfg.temperature, RETRY_TEMPERATURE),
            "seed": cfg.seed + attempt,
        }
        if cfg.max_tokens is not None:
            params["max_tokens"] = cfg.max_tokens
        schema = step_schema(batch)
        if self.response_format == "json_schema":
            params["response_format"] = {"type": "json_schema", "json_schema": {"name": "distill_step", "schema": schema}}
        elif self.response_format == "json_object":
            params["response_format"] = {"type": "json_object", "schema": schema}
        return params

    async def _answer(self, messages: list[dict], batch: list[BatchItem], attempt: int, user_id: int, step: int):
        while True:
            params = self._params(batch, attempt)
            key_params = {**params, "attempt": attempt}
            key = request_key(self.config.model, messages, key_params)
            cached = self.known.get(key)
            if cached is not None:
                self.tally.cached += 1
                return cached
            try:
                pending = self.inflight.get(key)
                if pending is not None:  # the same request from another user, in flight: share its answer
                    answer = await asyncio.shield(pending)
                    self.tally.cached += 1
                    return answer
                answer = await self._call(key, messages, params, key_params, user_id, step, attempt)
            except UnsupportedParameter as e:
                used = params.get("response_format", {}).get("type", "text")
                if used != self.response_format:
                    continue  # another user's request already fell back: try again in the new format
                if used == "text":
                    raise
                # The server refused the structured-output request: fall back one level, for all users.
                fallback = RESPONSE_FORMATS[RESPONSE_FORMATS.index(used) + 1]
                log.warning("server refused response_format %s (%s); falling back to %s", used, e, fallback)
                self.response_format = fallback
                continue
            return answer

    async def _call(self, key: str, messages: list[dict], params: dict, key_params: dict,
                    user_id: int, step: int, attempt: int):
        future = asyncio.get_running_loop().create_future()
        self.inflight[key] = future
        try:
            answer = await self.client.chat(messages, params)
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "exception was never retrieved" warning without waiters
            raise
        finally:
            del self.inflight[key]
        self.store.put(key, model=self.config.model, request={"messages": messages, "params": key_params},
                       answer=answer, user_id=user_id, step=step, attempt=attempt)
        self.known[key] = answer
        future.set_result(answer)
        self.tally.calls += 1
        self.tally.prompt_tokens += answer.prompt_tokens
        self.tally.completion_tokens += answer.completion_tokens
        return answer

    async def distill_user(self, user_id: int, batches: list[list[BatchItem]], bar: tqdm | None) -> tuple[str, dict[int, str]]:
        profile: str | None = None
        explanations: dict[int, str] = {}
        for step, batch in enumerate(batches):
            messages = step_messages(self.prompts, profile, batch, self.config.max_profile_words)
            reasons = []
            for attempt in range(self.config.max_attempts):
                answer = await self._answer(messages, batch, attempt, user_id, step)
                result, reason = validate_step(answer.content, batch, self.config.max_words)
                if result is not None:
                    break
                self.tally.rejected += 1
                reasons.append(f"attempt {attempt + 1}: {reason}")
            else:
                raise StepRejected(f"step {step + 1}/{len(batches)} rejected after {self.config.max_attempts} "
                                   f"generations: " + "; ".join(reasons))
            profile = result.profile
            explanations.update(result.explanations)
            if bar is not None:
                bar.update(1)
        return profile or "", explanations

    async def run(self, plan: dict[int, list[list[BatchItem]]]) -> tuple[dict[int, tuple[str, dict[int, str]]], list[dict]]:
        results: dict[int, tuple[str, dict[int, str]]] = {}
        failures: list[dict] = []
        total = sum(len(b) for b in plan.values())
        with tqdm(total=total, desc="distill steps", unit="step", disable=not self.config.progress,
                  file=sys.stderr) as bar:
            async def one(user_id: int, batches):
                try:
                    results[user_id] = await self.distill_user(user_id, batches, bar)
                    self.tally.users_done += 1
                except EndpointError:
                    raise
                except Deferred:
                    self.tally.users_waiting += 1
                except (StepRejected, LLMError) as e:
                    failures.append({"user_id": user_id, "reason": str(e)})
                    self.tally.users_failed += 1
                bar.set_postfix(done=self.tally.users_done, failed=self.tally.users_failed, cached=self.tally.cached)

            # Every task's outcome is collected (none is left unretrieved at shutdown); a fatal endpoint
            # error stops the run once.
            outcomes = await asyncio.gather(*(one(u, b) for u, b in plan.items()), return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        failures.sort(key=lambda f: f["user_id"])
        return results, failures


def resolve_api_key(env_name: str) -> str:
    key = os.environ.get(env_name)
    if key:
        return key
    # Local servers (llama.cpp, vLLM, Ollama) ignore the key, but the client insists on one.
    log.info("$%s is not set: sending a placeholder key (fine for local servers)", env_name)
    return "not-needed"


def estimate_plan(plan: dict[int, list[list[BatchItem]]], prompts: Prompts, cfg: DistillConfig) -> dict:
    """Calls and a rough token count (4 characters per token) before anything is spent."""
    chars_per_token = 4.0
    profile_chars = cfg.max_profile_words * 6
    prompt_tokens = completion_tokens = 0.0
    calls = 0
    for batches in plan.values():
        for step, batch in enumerate(batches):
            messages = step_messages(prompts, "x" * profile_chars if step else None, batch, cfg.max_profile_words)
            prompt_tokens += sum(len(m["content"]) for m in messages) / chars_per_token
            completion_tokens += (len(batch) * 200 + profile_chars) / chars_per_token
            calls += 1
    return {"users": len(plan), "calls": calls, "prompt_tokens": int(prompt_tokens),
            "completion_tokens": int(completion_tokens),
            # Batch mode: one round per step of the longest chain (each prompt holds the previous profile)
            "batch_rounds": max((len(b) for b in plan.values()), default=0)}


def endpoint_url(cfg: DistillConfig) -> str | None:
    return cfg.base_url or os.environ.get("OPENAI_BASE_URL") or None


def check_endpoint(cfg: DistillConfig) -> None:
    """The option the LLM backend cannot run without. A server URL is needed only for requests the
    store cannot answer (distill/batch.py says so then); a dry run needs neither."""
    if not cfg.model:
        raise ConfigError("--backend openai needs --model (the model name the server serves)")


def no_endpoint_error(waiting: int) -> ConfigError:
    return ConfigError(f"--backend openai needs --base-url (or $OPENAI_BASE_URL) for the {waiting} request(s) not "
                       "answered yet: the server's URL, e.g. http://127.0.0.1:8000/v1 for a local server or "
                       "https://api.openai.com/v1; or write them to OpenAI Batch files with --batch-out DIR")


def dry_run_estimate(train: pd.DataFrame, items: pd.DataFrame, cfg: DistillConfig,
                     price_per_1k: tuple[float, float] | None = None) -> dict:
    """Users, calls and a token estimate (and the cost at ``price_per_1k``) before anything is spent."""
    prompts = load_prompts(cfg.prompt_dir)
    estimate = estimate_plan(plan_batches(train, items, cfg.batch_size), prompts, cfg)
    if price_per_1k is not None:
        estimate["cost"] = round(estimate["prompt_tokens"] / 1000 * price_per_1k[0]
                                 + estimate["completion_tokens"] / 1000 * price_per_1k[1], 4)
    return estimate


def client_settings(cfg: DistillConfig) -> ClientSettings:
    return ClientSettings(
        base_url=endpoint_url(cfg), model=cfg.model, api_key=resolve_api_key(cfg.api_key_env), timeout=cfg.timeout,
        max_retries=cfg.max_retries, backoff_base=cfg.backoff_base, backoff_max=cfg.backoff_max,
        concurrency=cfg.concurrency,
    )


def distill_llm(run: RunFolder, train: pd.DataFrame, items: pd.DataFrame, traits: pd.DataFrame,
                cfg: DistillConfig) -> tuple[pd.DataFrame, pd.DataFrame, list[dict], dict, dict[str, Any]]:
    """(profiles, memories, failures, provenance, summary) of the users the endpoint distilled."""
    prompts = load_prompts(cfg.prompt_dir)
    plan = plan_batches(train, items, cfg.batch_size)
    settings = client_settings(cfg)
    with RequestStore(run.path(DISTILL_REQUESTS)) as store:
        async def go():
            client = ChatClient(settings, rng=random.Random(cfg.seed))
            try:
                distiller = LLMDistiller(cfg, prompts, store, client, response_format=cfg.response_format)
                return distiller, *(await distiller.run(plan))
            finally:
                await client.close()

        distiller, results, failures = asyncio.run(go())
        stored = store.totals()
    return assemble(distiller, results, failures, stored, train, traits, cfg, prompts)


def assemble(distiller: LLMDistiller, results: dict[int, tuple[str, dict[int, str]]], failures: list[dict],
             stored: dict, train: pd.DataFrame, traits: pd.DataFrame, cfg: DistillConfig,
             prompts: Prompts) -> tuple[pd.DataFrame, pd.DataFrame, list[dict], dict, dict[str, Any]]:
    """The stage's tables and summary from the distilled chains."""
    tally = distiller.tally
    trait_levels = traits.set_index("user_id")
    profile_rows, memory_rows = [], []
    for user_id, (profile, explanations) in sorted(results.items()):
        t = trait_levels.loc[user_id]
        profile_rows.append({"user_id": user_id, "profile": profile, "activity": t["activity"],
                             "conformity": t["conformity"], "diversity": t["diversity"],
                             "traits_text": render_traits_text(t["activity"], t["conformity"], t["diversity"])})
    done = train[train["user_id"].isin(list(results))]
    for r in done.itertuples(index=False):
        memory_rows.append({"user_id": r.user_id, "item_id": r.item_id, "rating": r.rating,
                            "timestamp": r.timestamp, "explanation": results[r.user_id][1][r.item_id]})
    profiles = pd.DataFrame(profile_rows, columns=PROFILE_FIELDS)
    memories = pd.DataFrame(memory_rows, columns=MEMORY_FIELDS)
    provenance = {"backend": BACKEND, "model": cfg.model, "prompt_version": prompts.version}
    summary = {"users_done": tally.users_done, "users_failed": tally.users_failed, "calls": tally.calls,
               "cached": tally.cached, "rejected_generations": tally.rejected,
               "transport_errors": distiller.client.transport_errors if distiller.client is not None else 0,
               "prompt_tokens": tally.prompt_tokens, "completion_tokens": tally.completion_tokens,
               "store_requests": stored["requests"], "store_prompt_tokens": stored["prompt_tokens"],
               "store_completion_tokens": stored["completion_tokens"],
               "response_format": distiller.response_format}
    return profiles, memories, failures, provenance, summary
