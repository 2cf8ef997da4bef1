"""The batch engine under the predictor: answer tokens, prompts cut at the answer, prefix-cached
batches (prefill once per user, suffixes in right-padded batches) and seeded sampling.

See persona_tune/evaluation/predict.py for how the predictor uses it.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from persona_tune.prompts import FitToLength
from persona_tune.errors import ConfigError
from persona_tune.prompts import PromptParts, render_messages
from persona_tune.runfolder import PROB_COLUMNS

RATING_VALUES = np.arange(1, 6, dtype=float)


def scored_frame(probs: np.ndarray, mass: np.ndarray) -> pd.DataFrame:
    """The scoring mode's columns of rows whose five rating tokens have the probabilities ``probs`` [n, 5]
    (renormalised over the five) and together ``mass`` of all next-token mass: p1..p5, rating_mass,
    expected_rating (the expectation) and argmax_rating. Every scorer (local, trunk, served) makes them here."""
    out = pd.DataFrame(probs, columns=PROB_COLUMNS)
    out["rating_mass"] = mass
    out["expected_rating"] = probs @ RATING_VALUES
    out["argmax_rating"] = probs.argmax(1) + 1.0
    return out


# ---------------------------------------------------------------- tokens


@dataclass(frozen=True)
class AnswerTokens:
    """Where the answer sits in a tokenised row, derived from the tokenizer itself."""

    rating_ids: tuple[int, ...]  # the token of "1".."5" at the answer position
    suffix_len: int  # tokens from the rating token to the end of a tokenised answered row
    stop_ids: tuple[int, ...]  # tokens that end generation (tokenizer stop tokens + end of turn)


def _tokenize(tokenizer, parts: PromptParts, rating: int) -> list[int]:
    """The row's tokens exactly as training's dataset makes them (the tokenizer's own transform)."""
    untruncated = copy.copy(tokenizer)
    untruncated.max_seq_len = None
    return list(untruncated({"messages": render_messages(parts, rating=rating)})["tokens"])


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def answer_tokens(tokenizer) -> AnswerTokens:
    """Tokenise one probe row with each answer "1".."5"; the first differing position is the answer."""
    probe = PromptParts(item="Toy Story (1995)", profile="I like animated films.", traits="activity: low.")
    seqs = [_tokenize(tokenizer, probe, r) for r in range(1, 6)]
    at = common_prefix_len(seqs)
    ids = tuple(s[at] if at < len(s) else -1 for s in seqs)
    if len(set(ids)) != 5 or -1 in ids:
        raise ConfigError(f"the tokenizer does not give the ratings 1-5 one distinct token each (got {ids})")
    if any(len(s) != len(seqs[0]) for s in seqs):
        raise ConfigError("the answers 1-5 tokenise to different lengths; cannot locate the answer token")
    special = set(getattr(tokenizer, "special_tokens", {}).values())
    stops = set(getattr(tokenizer, "stop_tokens", []) or [])
    if getattr(tokenizer, "eos_id", None) is not None:
        stops.add(tokenizer.eos_id)
    after = seqs[0][at + 1 : at + 2]
    if after and after[0] in special:  # the end-of-turn token that follows the answer in training
        stops.add(after[0])
    return AnswerTokens(rating_ids=ids, suffix_len=len(seqs[0]) - at, stop_ids=tuple(sorted(stops)))


def encode_prompt(fit: FitToLength, parts: PromptParts, answer: AnswerTokens) -> list[int]:
    """The row's prompt tokens (up to the answer), shrunk to the length limit as training's rows are.

    ``fit`` is the training dataset's model transform (persona_tune.prompts.FitToLength).
    """
    def tokens_for(rating: int) -> list[int]:
        sample = {"messages": render_messages(parts, rating=rating), "parts": parts, "rating": rating}
        return list(fit(sample)["tokens"])

    tokens = tokens_for(1)
    cut = len(tokens) - answer.suffix_len
    if cut > 0 and tokens[cut] == answer.rating_ids[0]:
        return tokens[:cut]
    # Unusual tokenisation around the answer: fall back to comparing two answers.
    return tokens[: common_prefix_len([tokens, tokens_for(2)])]


# ---------------------------------------------------------------- batching with a cached prefix


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """The tokens all ``prompts`` share, leaving each at least one token (its answer position)."""
    return min(common_prefix_len(prompts), min(map(len, prompts)) - 1)


@dataclass
class Batch:
    """Rows decoded together: positions in the caller's list, their groups and prompt suffixes."""

    rows: list[int]
    groups: list
    suffixes: list[list[int]]


def plan_batches(
    prompts: Sequence[Sequence[int]], groups: Sequence, batch_size: int = 16, token_budget: int = 8192,
    share_prefix: bool = True,
) -> tuple[dict, list[Batch]]:
    """Each group's shared prefix (empty without ``share_prefix``) and batches of row suffixes.

    Rows stay grouped (a group's prefix K/V is computed once and dropped after its last batch) and are
    sorted by suffix length inside a group, so right-padding is small. A batch holds at most
    ``batch_size`` rows and ``token_budget`` suffix tokens including padding.
    """
    order: dict = {}
    for i, g in enumerate(groups):
        order.setdefault(g, []).append(i)
    prefixes, flat = {}, []
    for g, rows in order.items():
        cut = shared_prefix_len([prompts[i] for i in rows]) if share_prefix else 0
        prefixes[g] = list(prompts[rows[0]][:cut])
        flat += sorted(((i, g, list(prompts[i][cut:])) for i in rows), key=lambda r: len(r[2]))
    batches, current = [], []
    for row in flat:
        longest = max([len(r[2]) for r in current] + [len(row[2])])
        if current and (len(current) >= batch_size or longest * (len(current) + 1) > token_budget):
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return prefixes, [Batch([r[0] for r in b], [r[1] for r in b], [r[2] for r in b]) for b in batches]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as an additive float mask: SDPA's CPU kernels run it ~1.6x faster."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))


def _hidden(model, tokens, mask, input_pos, n_layers: int | None = None):
    """Token embeddings through the first ``n_layers`` layers (all by default)."""
    h = model.tok_embeddings(tokens)
    for layer in model.layers[:n_layers]:
        h = layer(h, mask=mask, input_pos=input_pos)
    return h


def _caches(model):
    return [layer.attn.kv_cache for layer in model.layers]


@torch.inference_mode()
def prefill_prefix(model, prefix: Sequence[int], device="cpu", n_layers: int | None = None,
                   hidden: list | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run a prefix once through ``model`` (its first ``n_layers`` layers) with a KV cache; return
    each layer's (K, V) [H, P, D]. With ``hidden`` (a list), the last run layer's output [P, D] is appended to it."""
    n = len(prefix)
    dtype = next(model.parameters()).dtype
    with torch.device(device):
        model.setup_caches(batch_size=1, dtype=dtype, decoder_max_seq_len=n)
    try:
        mask = _additive(torch.ones(n, n, dtype=torch.bool).tril()[None], dtype).to(device)
        h = _hidden(model, torch.tensor([list(prefix)], device=device), mask, torch.arange(n, device=device)[None],
                    n_layers)
        if hidden is not None:
            hidden.append(h[0])
        return [(c.k_cache[0, :, :n].clone(), c.v_cache[0, :, :n].clone()) for c in _caches(model)[:n_layers]]
    finally:
        _delete_caches(model)


@dataclass
class SuffixPass:
    """The state of a batch after :func:`run_suffixes`: hidden states and what decoding more tokens needs."""

    h: torch.Tensor  # [B, L, D], the last run layer's output over the (right-padded) suffixes
    p_lens: torch.Tensor
    s_lens: torch.Tensor
    P: int
    L: int
    keys: torch.Tensor
    in_prefix: torch.Tensor


def run_suffixes(model, prefix_kv: Sequence[list | None], suffixes: Sequence[Sequence[int]], cache_len_extra: int = 0,
                 device="cpu", n_layers: int | None = None) -> SuffixPass:
    """Set up a batch KV cache, copy each row's prefix K/V in, and run the suffixes through the first
    ``n_layers`` layers. The cache of row b holds its prefix at [0, P_b) and its suffix at [P, P + L_b)
    (P, L: the longest prefix and suffix); the attention mask hides the gaps. The caller deletes the
    caches (``_delete_caches``) when done."""
    n_rows = len(suffixes)
    p_lens = torch.tensor([0 if kv is None else kv[0][0].shape[1] for kv in prefix_kv])
    s_lens = torch.tensor([len(s) for s in suffixes])
    P, L = int(p_lens.max()), int(s_lens.max())
    cache_len = P + L + cache_len_extra
    dtype = next(model.parameters()).dtype
    with torch.device(device):
        model.setup_caches(batch_size=n_rows, dtype=dtype, decoder_max_seq_len=cache_len)
    for layer, cache in enumerate(_caches(model)):
        for b, kv in enumerate(prefix_kv):
            if kv is not None and layer < len(kv):
                k, v = kv[layer]
                cache.k_cache[b, :, : k.shape[1]] = k
                cache.v_cache[b, :, : v.shape[1]] = v
        cache.cache_pos.add_(P)
    keys = torch.arange(cache_len)
    in_prefix = keys[None, :] < p_lens[:, None]  # [B, cache]
    tokens = torch.zeros(n_rows, L, dtype=torch.long)
    for b, s in enumerate(suffixes):
        tokens[b, : len(s)] = torch.tensor(list(s))
    query = torch.arange(L)
    own = (keys[None, :] >= P) & (keys[None, :] <= P + query[:, None])  # [L, cache]: own suffix, causal
    mask = in_prefix[:, None, :] | own[None]
    input_pos = p_lens[:, None] + query[None, :]
    h = _hidden(model, tokens.to(device), _additive(mask, dtype).to(device), input_pos.to(device), n_layers)
    return SuffixPass(h, p_lens, s_lens, P, L, keys, in_prefix)


@torch.inference_mode()
def decode_batch(
    model, prefix_kv: Sequence[list | None], suffixes: Sequence[Sequence[int]], step: Callable,
    max_new_tokens: int = 1, device="cpu",
) -> int:
    """Predict the next token after each row's prefix + suffix, in one batch, and keep decoding.

    ``prefix_kv[b]`` is row b's prefix K/V from :func:`prefill_prefix` (None: no prefix). The cache
    of row b holds its prefix at [0, P_b), its suffix at [P, P + L_b) (P, L: the longest prefix and
    suffix) and its new tokens from P + L on; the attention mask hides the gaps. ``step(logits
    [B, V]) -> (next ids, all_done)`` is called after the prompt and after each new token, at most
    ``max_new_tokens`` times. Returns the number of tokens run through the model (padding included).
    """
    n_rows = len(suffixes)
    dtype = next(model.parameters()).dtype
    try:
        run = run_suffixes(model, prefix_kv, suffixes, max(max_new_tokens - 1, 0), device)
        h, p_lens, s_lens, P, L, keys, in_prefix = run.h, run.p_lens, run.s_lens, run.P, run.L, run.keys, run.in_prefix
        logits = model.unembed(h[torch.arange(n_rows), s_lens - 1][:, None])[:, 0].float()
        processed = n_rows * L
        suffix_visible = in_prefix | ((keys[None, :] >= P) & (keys[None, :] < P + s_lens[:, None]))
        head = model.output if hasattr(model.output, "enabled") else None  # a rating head rates the answer only
        for t in range(max_new_tokens):
            ids, all_done = step(logits)
            if all_done or t == max_new_tokens - 1:
                break
            if head is not None:
                head.enabled = False
            new_visible = (keys >= P + L) & (keys <= P + L + t)
            mask_t = (suffix_visible | new_visible[None, :])[:, None, :]
            pos_t = (p_lens + s_lens + t)[:, None]
            out = model(torch.tensor(ids, device=device)[:, None], mask=_additive(mask_t, dtype).to(device),
                        input_pos=pos_t.to(device))
            logits = out[:, -1].float()
            processed += n_rows
        return processed
    finally:
        if hasattr(model.output, "enabled"):
            model.output.enabled = True
        _delete_caches(model)


# ---------------------------------------------------------------- sampling


@dataclass(frozen=True)
class GenerationConfig:
    """The paper's decoding: 4 new tokens, temperature 0.3. It writes "top-p set to 50"; a
    probability cannot be 50, so it is read as top-k 50 here, with top_p available separately."""

    max_new_tokens: int = 4
    temperature: float = 0.3
    top_k: int | None = 50
    top_p: float | None = None
    parser: str = "lenient"
    seed: int = 0


def top_p_filter(logits: torch.Tensor, top_p: float | None, temperature: float) -> torch.Tensor:
    """Set logits outside the nucleus (smallest set with probability >= top_p at ``temperature``) to -inf."""
    if top_p is None or top_p >= 1.0:
        return logits
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token already >= top_p
    remove = torch.zeros_like(outside).scatter(-1, order, outside)
    return logits.masked_fill(remove, float("-inf"))


def row_generator(seed: int, key) -> torch.Generator:
    """A generator per row, so a row's samples do not depend on batching or order."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def draw_q(vocab: int, gen: torch.Generator) -> torch.Tensor:
    """The exponential noise torchtune's ``sample`` uses (same call as torchtune.generation.generate)."""
    return torch.empty((1, vocab)).exponential_(1, generator=gen)


def _delete_caches(model) -> None:
    for layer in model.layers:
        attn = getattr(layer, "attn", None)
        if attn is not None and getattr(attn, "kv_cache", None) is not None:
            attn.kv_cache = None
            attn.cache_enabled = False
