"""The prediction core shared by the eval recipe and UserAgent: prompts -> ratings.

Two ways to read a rating off a model:
- scoring: one forward pass; the next-token probabilities of the five rating tokens at the answer
  position, renormalised over the five; prediction = their expectation (argmax reported too). Every
  row gets a rating, so URR is 0 by construction.
- generation (the paper's): sample up to ``max_new_tokens`` tokens (temperature, top-k, top-p) and
  parse the first rating out of the text; a row without one counts toward URR.

Batching with a shared prefix. All rows of a user share their first tokens (the system prompt with
M_s and traits, and the start of the task). That prefix runs once per user into torchtune's KV cache
(``model.setup_caches``); its keys and values are copied into each row of a batch cache, and the
batch then runs only the rows' suffixes (right-padded; the attention mask hides the padding and the
gap between a short prefix and the suffixes; positions continue after each row's own prefix). A
row thus costs its suffix instead of its whole prompt, and gets the same logits as running the
prompt alone (the tests check this against a plain forward pass and torchtune's ``generate``).

The prompt of a row is the token sequence where the five possible answers "1".."5" first differ:
training's messages rendered by persona_tune.prompts with the assistant's answer, cut before the
rating token (so a SentencePiece "▁" before the digit stays in the prompt).

This module is the public predictor (``RatingPredictor``, ``predict_rows``); the batch engine under
it is persona_tune/evaluation/engine.py, LoRA merging is in loading.py, and the paper's one-row-at-a-
time loop it is checked against is benchmarks/naive_loop.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torchtune.generation import sample as tt_sample
from tqdm.auto import tqdm

from persona_tune.prompts import FitToLength
from persona_tune.evaluation.engine import (  # noqa: F401 (the engine's public names, also from here)
    PROB_COLUMNS,
    RATING_VALUES,
    AnswerTokens,
    GenerationConfig,
    _delete_caches,
    answer_tokens,
    common_prefix_len,
    decode_batch,
    draw_q,
    encode_prompt,
    plan_batches,
    prefill_prefix,
    row_generator,
    run_suffixes,
    scored_frame,
    shared_prefix_len,
    top_p_filter,
)
from persona_tune.evaluation.head import prior_features
from persona_tune.evaluation.parsing import get_parser
from persona_tune.prompts import PromptParts

# ---------------------------------------------------------------- the predictor


@dataclass
class PredictStats:
    rows: int = 0
    forward_passes: int = 0
    tokens_processed: int = 0  # tokens through the model, all passes
    prompt_tokens: int = 0  # sum of full prompt lengths (what a per-row pass processes)
    floor_tokens: int = 0  # each user's shared prefix once + every suffix: the prefix-shared floor

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        if self.rows:
            d["tokens_per_row"] = self.tokens_processed / self.rows
            d["prompt_tokens_per_row"] = self.prompt_tokens / self.rows
            d["floor_tokens_per_row"] = self.floor_tokens / self.rows
        return d


@dataclass
class RatingPredictor:
    """Predict ratings with a loaded torchtune model and its tokenizer."""

    model: torch.nn.Module
    tokenizer: object
    device: str | torch.device = "cpu"
    max_seq_len: int | None = None  # default: the tokenizer's max_seq_len
    batch_size: int = 16  # rows per forward pass
    token_budget: int = 8192  # suffix tokens (with padding) per forward pass
    share_prefix: bool = True  # run each user's shared prompt prefix once
    progress: bool = True
    stats: PredictStats = field(default_factory=PredictStats)
    row_priors: np.ndarray | None = None  # per prompt, for a rating head that reads the stated numbers

    def __post_init__(self):
        self.answer = answer_tokens(self.tokenizer)
        if self.max_seq_len is None:
            self.max_seq_len = getattr(self.tokenizer, "max_seq_len", None)
        self._vocab = self.model.tok_embeddings.num_embeddings
        self._fit = FitToLength(self.tokenizer, self.max_seq_len)

    def encode(self, parts_list: Iterable[PromptParts]) -> list[list[int]]:
        return [encode_prompt(self._fit, p, self.answer) for p in parts_list]

    def _run(self, prompts, groups, step_for: Callable, max_new_tokens: int, desc: str) -> None:
        """Plan batches, prefill each group's prefix once, and decode every batch with ``step_for(batch)``."""
        prefixes, batches = plan_batches(prompts, groups, self.batch_size, self.token_budget, self.share_prefix)
        self.stats.rows += len(prompts)
        self.stats.prompt_tokens += sum(map(len, prompts))
        floor_prefixes = plan_batches(prompts, groups, share_prefix=True)[0]
        self.stats.floor_tokens += sum(map(len, prompts)) - sum(
            len(floor_prefixes[g]) for g in groups) + sum(map(len, floor_prefixes.values()))
        remaining = {g: 0 for g in prefixes}
        for batch in batches:
            for g in batch.groups:
                remaining[g] += 1
        cached: dict = {}
        bar = tqdm(total=len(prompts), desc=desc, unit="row", disable=not self.progress, leave=False)
        for batch in batches:
            for g in dict.fromkeys(batch.groups):
                if g not in cached:
                    cached[g] = prefill_prefix(self.model, prefixes[g], self.device) if prefixes[g] else None
                    self.stats.tokens_processed += len(prefixes[g])
                    self.stats.forward_passes += bool(prefixes[g])
            kv = [cached[g] for g in batch.groups]
            if self.row_priors is not None:  # a rating head that reads each row's stated numbers
                self.model.output.row_priors = torch.from_numpy(self.row_priors[batch.rows])
            self.stats.tokens_processed += decode_batch(
                self.model, kv, batch.suffixes, step_for(batch), max_new_tokens, self.device
            )
            self.stats.forward_passes += 1
            for g in batch.groups:
                remaining[g] -= 1
                if remaining[g] == 0:
                    cached.pop(g, None)
            bar.update(len(batch.rows))
        bar.close()

    # -- scoring mode
    def score(self, prompts: Sequence[Sequence[int]], groups: Sequence) -> pd.DataFrame:
        """p1..p5 (renormalised over the five), rating_mass (their share of all next-token mass),
        expected_rating and argmax_rating, one row per prompt in input order."""
        probs = np.zeros((len(prompts), 5))
        mass = np.zeros(len(prompts))
        ids = torch.tensor(self.answer.rating_ids)

        def step_for(batch):
            def step(logits):
                logprobs = torch.log_softmax(logits, dim=-1)[:, ids]
                mass[batch.rows] = logprobs.exp().sum(-1).cpu().numpy()
                probs[batch.rows] = torch.softmax(logprobs, dim=-1).cpu().numpy()
                return None, True
            return step

        self._run(prompts, groups, step_for, 1, "scoring")
        return scored_frame(probs, mass)

    # -- generation mode
    def generate(
        self, prompts: Sequence[Sequence[int]], groups: Sequence, keys: Sequence, gen: GenerationConfig
    ) -> pd.DataFrame:
        """raw_text, parsed_rating (NaN if none) and n_new_tokens per prompt. ``keys`` seed each row's sampling."""
        parse = get_parser(gen.parser)
        generated: list[list[int]] = [[] for _ in prompts]
        rngs = [row_generator(gen.seed, k) for k in keys]
        done = np.zeros(len(prompts), dtype=bool)
        stops = set(self.answer.stop_ids)

        def step_for(batch):
            def step(logits):
                logits = top_p_filter(logits, gen.top_p, gen.temperature)
                q = torch.cat([draw_q(self._vocab, rngs[r]) for r in batch.rows]).to(logits.device)
                ids = tt_sample(logits, temperature=gen.temperature, top_k=gen.top_k, q=q)[:, 0].tolist()
                for r, t in zip(batch.rows, ids):
                    if not done[r]:
                        generated[r].append(int(t))
                        done[r] = t in stops
                return ids, bool(done[batch.rows].all())
            return step

        self._run(prompts, groups, step_for, gen.max_new_tokens, "generating")
        texts = [self.decode(g) for g in generated]
        return pd.DataFrame(
            {"raw_text": texts, "parsed_rating": [parse(t) for t in texts],
             "n_new_tokens": [len(g) for g in generated]}
        )

    def decode(self, ids: Sequence[int]) -> str:
        stops = set(self.answer.stop_ids)
        kept = []
        for t in ids:
            if t in stops:
                break
            kept.append(int(t))
        return self.tokenizer.decode(kept)


# ---------------------------------------------------------------- rows in, predictions out

def prediction_block(rows: pd.DataFrame, mode: str, outputs: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (their own columns) with one mode's ``outputs`` (scoring: scored_frame's columns;
    paper: raw_text, parsed_rating, ...), the other mode's columns empty, ``prediction`` (the mode's
    rating: expected_rating, or parsed_rating, NaN if none) and ``mode``: the rows of a predictions.parquet
    (runfolder.PREDICTIONS_LAYOUT has the columns it keeps)."""
    block = rows.copy()
    for col in outputs.columns:
        block[col] = outputs[col].to_numpy()
    if mode == "scoring":
        block["raw_text"] = ""
        block["parsed_rating"] = np.nan
        block["prediction"] = block["expected_rating"]
    else:
        for col in ("expected_rating", "argmax_rating", "rating_mass", *PROB_COLUMNS):
            block[col] = np.nan
        block["prediction"] = block["parsed_rating"]
    block["mode"] = mode
    return block


def predict_rows(predictor: RatingPredictor, rows: pd.DataFrame, modes: Sequence[str], gen: GenerationConfig) -> pd.DataFrame:
    """Predictions for ``rows`` (user_id, item_id, parts, ...), one block of rows per mode.

    Scoring rows fill p1..p5, rating_mass, expected_rating, argmax_rating; paper rows fill raw_text and
    parsed_rating. ``prediction`` is the mode's rating: expected_rating, or parsed_rating (NaN if none).
    """
    prompts = predictor.encode(rows["parts"])
    groups = rows["user_id"].tolist()
    head = getattr(getattr(predictor.model, "output", None), "head", None)
    # A frozen-trunk rating head that reads the rows' stated numbers (or a remote rater, which adds
    # its head's terms itself: persona_tune.serving.remote).
    prior = head.prior if getattr(head, "n_prior", 0) else getattr(predictor, "prior", None)
    if prior not in (None, "none"):
        predictor.row_priors = prior_features(list(rows["parts"]), prior)
    base = rows.drop(columns=["parts"]).reset_index(drop=True)
    base["n_prompt_tokens"] = [len(p) for p in prompts]
    blocks = []
    for mode in modes:
        if mode == "scoring":
            outputs = predictor.score(prompts, groups)
        else:
            keys = [f"{u}:{i}" for u, i in zip(rows["user_id"], rows["item_id"])]
            outputs = predictor.generate(prompts, groups, keys, gen)
        blocks.append(prediction_block(base, mode, outputs))
    return pd.concat(blocks, ignore_index=True)
