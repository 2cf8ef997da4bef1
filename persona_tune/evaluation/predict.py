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
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torchtune.generation import generate as tt_generate
from torchtune.generation import sample as tt_sample
from torchtune.modules.peft import LoRALinear
from tqdm.auto import tqdm

from persona_tune.datasets import FitToLength
from persona_tune.errors import ConfigError
from persona_tune.evaluation.parsing import get_parser
from persona_tune.prompts import PromptParts, render_messages

RATING_VALUES = np.arange(1, 6, dtype=float)
PROB_COLUMNS = [f"p{r}" for r in range(1, 6)]


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


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
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
    at = _common_prefix_len(seqs)
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

    ``fit`` is the training dataset's model transform (persona_tune.datasets.FitToLength).
    """
    def tokens_for(rating: int) -> list[int]:
        sample = {"messages": render_messages(parts, rating=rating), "parts": parts, "rating": rating}
        return list(fit(sample)["tokens"])

    tokens = tokens_for(1)
    cut = len(tokens) - answer.suffix_len
    if cut > 0 and tokens[cut] == answer.rating_ids[0]:
        return tokens[:cut]
    # Unusual tokenisation around the answer: fall back to comparing two answers.
    return tokens[: _common_prefix_len([tokens, tokens_for(2)])]


# ---------------------------------------------------------------- batching with a cached prefix


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """The tokens all ``prompts`` share, leaving each at least one token (its answer position)."""
    return min(_common_prefix_len(prompts), min(map(len, prompts)) - 1)


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
        out = pd.DataFrame(probs, columns=PROB_COLUMNS)
        out["rating_mass"] = mass
        out["expected_rating"] = probs @ RATING_VALUES
        out["argmax_rating"] = probs.argmax(1) + 1.0
        return out

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


# ---------------------------------------------------------------- the paper's loop (baseline)


def naive_generate(
    model, tokenizer, prompts: Sequence[Sequence[int]], keys: Sequence, gen: GenerationConfig,
    answer: AnswerTokens | None = None, progress: bool = True, device="cpu",
) -> pd.DataFrame:
    """The paper's path: one row at a time, torchtune's ``generate`` with a KV cache, then the regex.

    No batching and no prefix reuse; kept as the reference the batched path is measured against.
    """
    answer = answer or answer_tokens(tokenizer)
    parse = get_parser(gen.parser)
    dtype = next(model.parameters()).dtype
    longest = max(map(len, prompts)) + gen.max_new_tokens
    next_token = _top_p_next_token(gen.top_p, gen.temperature)
    texts, news = [], []
    with torch.inference_mode(), torch.device(device):
        model.setup_caches(batch_size=1, dtype=dtype, decoder_max_seq_len=longest)
        try:
            for prompt, key in tqdm(list(zip(prompts, keys)), desc="naive generate", disable=not progress, leave=False):
                model.reset_caches()
                out, _ = tt_generate(
                    model, torch.tensor(prompt, device=device), max_generated_tokens=gen.max_new_tokens,
                    temperature=gen.temperature, top_k=gen.top_k, stop_tokens=list(answer.stop_ids),
                    rng=row_generator(gen.seed, key), custom_generate_next_token=next_token,
                )
                new = out[0, len(prompt):].tolist()
                ids = []
                for t in new:
                    if t in answer.stop_ids:
                        break
                    ids.append(t)
                texts.append(tokenizer.decode(ids))
                news.append(len(new))
        finally:
            model.reset_caches()
            _delete_caches(model)
    return pd.DataFrame({"raw_text": texts, "parsed_rating": [parse(t) for t in texts], "n_new_tokens": news})


def _top_p_next_token(top_p: float | None, temperature: float) -> Callable | None:
    if top_p is None or top_p >= 1.0:
        return None

    def next_token(model, input_pos, x, q=None, *, mask=None, temperature=temperature, top_k=None):
        logits = model(x, input_pos=input_pos, mask=mask)[:, -1]
        filtered = top_p_filter(logits, top_p, temperature)
        return tt_sample(filtered.clone(), temperature=temperature, top_k=top_k, q=q), logits.unsqueeze(1)

    return next_token


def _delete_caches(model) -> None:
    for layer in model.layers:
        attn = getattr(layer, "attn", None)
        if attn is not None and getattr(attn, "kv_cache", None) is not None:
            attn.kv_cache = None
            attn.cache_enabled = False


# ---------------------------------------------------------------- adapters


def merge_lora_in_place(model: torch.nn.Module) -> int:
    """Fold every LoRA into its base weight (W += alpha/r * B A) and switch the LoRA path off.

    Returns the number of merged modules. Raises ConfigError for DoRA or a quantised base.
    """
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            if getattr(module, "_quantize_base", False):
                raise ConfigError(f"{name}: cannot merge a LoRA into a quantised base; set merge_adapter: False")
            with torch.no_grad():
                delta = module.lora_b.weight @ module.lora_a.weight
                module.weight.add_((module.alpha / module.rank) * delta.to(module.weight.dtype))
            module.disabled = True
            n += 1
        elif type(module).__name__ == "DoRALinear":
            raise ConfigError(f"{name}: DoRA adapters are evaluated unmerged; set merge_adapter: False")
    return n


# ---------------------------------------------------------------- rows in, predictions out

PREDICTION_COLUMNS = [
    "mode", "raw_text", "parsed_rating", "expected_rating", "argmax_rating", *PROB_COLUMNS,
    "rating_mass", "prediction",
]


def predict_rows(predictor: RatingPredictor, rows: pd.DataFrame, modes: Sequence[str], gen: GenerationConfig) -> pd.DataFrame:
    """Predictions for ``rows`` (user_id, item_id, parts, ...), one block of rows per mode.

    Scoring rows fill p1..p5, rating_mass, expected_rating, argmax_rating; paper rows fill raw_text and
    parsed_rating. ``prediction`` is the mode's rating: expected_rating, or parsed_rating (NaN if none).
    """
    prompts = predictor.encode(rows["parts"])
    groups = rows["user_id"].tolist()
    base = rows.drop(columns=["parts"]).reset_index(drop=True)
    base["n_prompt_tokens"] = [len(p) for p in prompts]
    blocks = []
    for mode in modes:
        block = base.copy()
        if mode == "scoring":
            scored = predictor.score(prompts, groups)
            for col in scored.columns:
                block[col] = scored[col].to_numpy()
            block["raw_text"] = ""
            block["parsed_rating"] = np.nan
            block["prediction"] = block["expected_rating"]
        else:
            keys = [f"{u}:{i}" for u, i in zip(rows["user_id"], rows["item_id"])]
            generated = predictor.generate(prompts, groups, keys, gen)
            for col in generated.columns:
                block[col] = generated[col].to_numpy()
            for col in ("expected_rating", "argmax_rating", "rating_mass", *PROB_COLUMNS):
                block[col] = np.nan
            block["prediction"] = block["parsed_rating"]
        block["mode"] = mode
        blocks.append(block)
    return pd.concat(blocks, ignore_index=True)
