"""The `distill` stage's options (DistillConfig): the signature of persona_tune/distill/run.py's ``run``,
read by the distillers (llm.py, batch.py) too, so it sits below all of them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from persona_tune.errors import ConfigError

BACKENDS = ("offline", "openai")
RESPONSE_FORMATS = ("json_schema", "json_object", "text")  # structured output, each falling back to the next
MAX_LINES = 50_000  # OpenAI's limit of requests per batch file
TRANSPORT_KEYS = ("base_url", "api_key_env", "concurrency", "max_retries", "timeout", "backoff_base", "backoff_max",
                  "batch_out", "batch_in", "batch_max_lines")


def parse_trait_cuts(text: str) -> dict[str, tuple[float, float]]:
    """--trait-cuts: a JSON object of [low, high] pairs."""
    try:
        return {k: tuple(v) for k, v in json.loads(text).items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"--trait-cuts is not a JSON object of [low, high] pairs: {e}") from None


LLM = "openai backend"  # the CLI's argument group of the LLM backend's options
BATCH = "openai backend through Batch files"


@dataclass
class DistillConfig:
    """The `distill` stage's options; its CLI arguments are generated from these fields (persona_tune/stage.py)."""

    backend: str = field(default="offline", metadata={
        "choices": BACKENDS, "help": "offline: rule-based text from each user's statistics, no LLM; "
                                     "openai: the paper's self-reflection through an OpenAI-compatible server"})
    users: int | None = field(default=None, metadata={"min": 1, "help": "distil the first N users (by user_id) only"})
    trait_cuts: dict[str, tuple[float, float]] | None = field(default=None, metadata={
        "parse": parse_trait_cuts,
        "help": 'fixed trait cut points as JSON, e.g. \'{"activity": [60, 120], "conformity": [0.6, 1.2], '
                '"diversity": [5, 7]}\' (default: percentiles over this run\'s users)'})
    # LLM backend
    base_url: str | None = field(default=None, metadata={
        "group": LLM, "help": "server URL, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL)"})
    model: str | None = field(default=None, metadata={"group": LLM, "help": "model name the server serves"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "group": LLM, "help": "environment variable that holds the API key"})
    concurrency: int = field(default=8, metadata={"min": 1, "group": LLM, "help": "requests in flight at most"})
    batch_size: int = field(default=10, metadata={"min": 1, "group": LLM, "help": "ratings per reflection step"})
    max_words: int = field(default=2000, metadata={"min": 1, "group": LLM, "help": "reject generations longer than this"})
    max_attempts: int = field(default=3, metadata={"min": 1, 
        "group": LLM, "help": "generations per step before the step (and its user) is rejected"})
    max_retries: int = field(default=6, metadata={"group": LLM, "help": "retries per request on 429/5xx/timeouts"})
    timeout: float = field(default=120.0, metadata={"gt": 0, "group": LLM, "help": "seconds per request"})
    backoff_base: float = field(default=0.5, metadata={"group": LLM, "help": "first retry delay, seconds (doubles)"})
    backoff_max: float = field(default=30.0, metadata={"gt": 0, "group": LLM, "help": "longest retry delay, seconds"})
    temperature: float = field(default=0.3, metadata={
        "group": LLM, "help": "sampling temperature of the first generation of a step (retries sample hotter)"})
    max_tokens: int | None = field(default=None, metadata={"min": 1, "group": LLM, "help": "completion token limit per request"})
    max_profile_words: int = field(default=400, metadata={"min": 1, "group": LLM, "help": "profile length asked for"})
    response_format: str = field(default="json_schema", metadata={
        "group": LLM, "choices": RESPONSE_FORMATS,
        "help": "structured output to ask for; falls back to the next one if the server refuses it"})
    seed: int = field(default=0, metadata={
        "group": LLM, "help": "request seed (servers that honour it answer reproducibly) and the retry jitter's"})
    prompt_dir: str | None = field(default=None, metadata={
        "group": LLM, "help": "folder with replacement prompt templates (same file names)"})
    progress: bool = field(default=True, metadata={"flag": "--no-progress", "help": "no progress bar"})
    # Batch mode (distill/batch.py)
    batch_out: str | None = field(default=None, metadata={
        "group": BATCH, "metavar": "DIR",
        "help": "write every request not answered yet to OpenAI Batch input files in DIR (one round: each "
                "user's next step); writes the outputs instead when nothing is left to ask"})
    batch_in: tuple[str, ...] = field(default=(), metadata={
        "group": BATCH, "metavar": "FILE",
        "help": "load OpenAI Batch output files (or `vllm run-batch` output) into the request store first"})
    batch_max_lines: int = field(default=MAX_LINES, metadata={"min": 1, 
        "group": BATCH, "help": "requests per Batch input file at most"})

    def validate(self) -> None:
        # Each field's choices and range are in its metadata (persona_tune.stage.validate checks them first).
        if (self.batch_out or self.batch_in) and self.backend != "openai":
            raise ConfigError("--batch-out and --batch-in need --backend openai")

    def results_params(self) -> dict[str, Any]:
        """params() without the transport settings, which change how the answers arrive, not which."""
        return {k: v for k, v in self.params().items() if k not in TRANSPORT_KEYS}

    def params(self) -> dict[str, Any]:
        """What the manifest records (never the API key itself); the offline backend uses only three."""
        params = {k: v for k, v in asdict(self).items() if k != "progress"}
        params["batch_in"] = list(params["batch_in"])
        if self.backend == "offline":
            params = {k: params[k] for k in ("backend", "users", "trait_cuts")}
        return params
