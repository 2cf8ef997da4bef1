"""The prediction core shared by the eval recipe and UserAgent: prompts -> ratings.

Two ways to read a rating off a model:
- scoring: one forward pass; the next-token probabilities of the five rating tokens at the answer
  position, renormalised over the five; prediction = their expectation (argmax reported too). Every
  row gets a rating, so URR is 0 by construction.
- generation (the paper's): sample up to ``max_new_tokens`` tokens (temperature, top-k, top-p) and
  parse the first rating out of the text; a row without one counts toward URR.

Batching with a shared prefix. All rows of a user share their first tokens (the system prompt with
M_s and traits, and the start of the task). Rows are packed into one sequence per forward pass: each
user's shared prefix once, then that user's row suffixes, under a block attention mask (a suffix
sees the prefix and itself, nothing else) with positions that restart after the prefix. A pass thus
processes about prefix/rows + suffix tokens per row instead of the whole prompt, and gives the same
logits as running each prompt alone (the tests check this against torchtune's ``generate``).

The prompt of a row is the token sequence where the five possible answers "1".."5" first differ:
training's messages rendered by persona_tune.prompts with the assistant's answer, cut before the
rating token (so a SentencePiece "▁" before the digit stays in the prompt).
"""

from __future__ import annotations

import copy
import hashlib
import math
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


# ---------------------------------------------------------------- packing


@dataclass
class Segment:
    """One user's shared prefix and the remaining tokens of several of their rows."""

    prefix: list[int]
    suffixes: list[list[int]]
    rows: list[int]  # positions in the caller's row list

    @property
    def n_tokens(self) -> int:
        return len(self.prefix) + sum(map(len, self.suffixes))


def build_segments(
    prompts: Sequence[Sequence[int]], groups: Sequence, max_rows: int = 16, share_prefix: bool = True
) -> list[Segment]:
    """Segments of at most ``max_rows`` rows of one group (user), each with the group's shared prefix."""
    by_group: dict = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    segments = []
    for rows in by_group.values():
        seqs = [list(prompts[i]) for i in rows]
        # Keep at least one token per row in its suffix: the answer is read at the suffix's last token.
        shared = min(_common_prefix_len(seqs), min(map(len, seqs)) - 1) if share_prefix else 0
        for start in range(0, len(rows), max_rows if share_prefix else 1):
            chunk = rows[start : start + (max_rows if share_prefix else 1)]
            segments.append(
                Segment(prefix=seqs[0][:shared], suffixes=[list(prompts[i])[shared:] for i in chunk], rows=chunk)
            )
    return segments


def pack_segments(segments: Sequence[Segment], token_budget: int) -> list[list[Segment]]:
    """Greedy packs of whole segments with at most ``token_budget`` tokens (a bigger segment goes alone)."""
    packs, current, size = [], [], 0
    for seg in segments:
        if current and size + seg.n_tokens > token_budget:
            packs.append(current)
            current, size = [], 0
        current.append(seg)
        size += seg.n_tokens
    if current:
        packs.append(current)
    return packs


def _pack_layout(pack: Sequence[Segment]):
    """Flattened tokens, positions, segment ids, branch ids (0 = prefix, b = b-th suffix) and last indices."""
    tokens, pos, seg_id, branch, last = [], [], [], [], []
    for s, seg in enumerate(pack):
        tokens += seg.prefix
        pos += range(len(seg.prefix))
        seg_id += [s] * len(seg.prefix)
        branch += [0] * len(seg.prefix)
        for b, suffix in enumerate(seg.suffixes, start=1):
            tokens += suffix
            pos += range(len(seg.prefix), len(seg.prefix) + len(suffix))
            seg_id += [s] * len(suffix)
            branch += [b] * len(suffix)
            last.append(len(tokens) - 1)
    return tokens, pos, torch.tensor(seg_id), torch.tensor(branch), last


def visibility(q_seg, q_branch, q_index, k_seg, k_branch) -> torch.Tensor:
    """[q, k] True where a query may attend a key: same segment, key not later, key in the prefix or
    in the query's own branch."""
    k_index = torch.arange(len(k_seg))
    return (
        (q_seg[:, None] == k_seg[None, :])
        & (k_index[None, :] <= q_index[:, None])
        & ((k_branch[None, :] == 0) | (k_branch[None, :] == q_branch[:, None]))
    )


def packed_inputs(pack: Sequence[Segment]):
    """tokens [1, S], input_pos [1, S], mask [1, S, S] (True = may attend), and each suffix's last index."""
    tokens, pos, seg_t, br_t, last = _pack_layout(pack)
    mask = visibility(seg_t, br_t, torch.arange(len(tokens)), seg_t, br_t)
    return torch.tensor([tokens]), torch.tensor([pos]), mask[None], last


def _run_layers(model, tokens, mask, input_pos, last) -> torch.Tensor:
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h, mask=mask, input_pos=input_pos)
    # Unembed only the answer positions (the vocabulary projection dominates memory for big vocabularies).
    return model.unembed(h[:, last]).float()[0]


@torch.inference_mode()
def last_token_logits(model, pack: Sequence[Segment], device="cpu") -> torch.Tensor:
    """Run the pack through ``model`` and return the float32 logits at each suffix's last token [n, V]."""
    tokens, input_pos, mask, last = packed_inputs(pack)
    return _run_layers(model, tokens.to(device), mask.to(device), input_pos.to(device), last)


@torch.inference_mode()
def generate_pack(model, pack: Sequence[Segment], step: Callable, max_new_tokens: int, device="cpu") -> int:
    """Decode up to ``max_new_tokens`` per suffix of ``pack`` with one KV cache for the whole pack.

    The packed prompt is prefilled once; each decoding step appends one token per row to the cache,
    and a row's new token sees its segment's prefix, its own suffix and its own earlier tokens.
    ``step(logits [n, V]) -> (next ids [n], all_done)`` samples and records. Returns tokens processed.
    """
    tokens, pos, seg_t, br_t, last = _pack_layout(pack)
    n_rows, length = len(last), len(tokens)
    cache_len = length + n_rows * max(max_new_tokens - 1, 0)
    dtype = next(model.parameters()).dtype
    row_seg, row_branch = seg_t[last], br_t[last]
    mask = torch.zeros(1, length, cache_len, dtype=torch.bool)
    mask[0, :, :length] = visibility(seg_t, br_t, torch.arange(length), seg_t, br_t)
    with torch.device(device):
        model.setup_caches(batch_size=1, dtype=dtype, decoder_max_seq_len=cache_len)
    try:
        logits = _run_layers(model, torch.tensor([tokens], device=device), mask.to(device),
                             torch.tensor([pos], device=device), last)
        processed = length
        next_pos = torch.tensor(pos)[last] + 1
        k_seg, k_branch = seg_t, br_t
        for _ in range(max_new_tokens - 1):
            ids, all_done = step(logits)
            if all_done:
                return processed
            k_seg, k_branch = torch.cat([k_seg, row_seg]), torch.cat([k_branch, row_branch])
            q_index = torch.arange(len(k_seg) - n_rows, len(k_seg))
            step_mask = torch.zeros(1, n_rows, cache_len, dtype=torch.bool)
            step_mask[0, :, : len(k_seg)] = visibility(row_seg, row_branch, q_index, k_seg, k_branch)
            logits = model(torch.tensor([ids], device=device), mask=step_mask.to(device),
                           input_pos=next_pos[None].to(device))[0].float()
            processed += n_rows
            next_pos = next_pos + 1
        step(logits)
        return processed
    finally:
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
    token_budget: int = 2048  # tokens per packed forward pass
    max_rows_per_segment: int = 16  # rows sharing one copy of a user's prefix in a pass
    share_prefix: bool = True
    progress: bool = True
    stats: PredictStats = field(default_factory=PredictStats)

    def __post_init__(self):
        self.answer = answer_tokens(self.tokenizer)
        if self.max_seq_len is None:
            self.max_seq_len = getattr(self.tokenizer, "max_seq_len", None)
        self._vocab = self.model.tok_embeddings.num_embeddings
        self._fit = FitToLength(self.tokenizer, self.max_seq_len)

    # -- inputs
    def encode(self, parts_list: Iterable[PromptParts]) -> list[list[int]]:
        return [encode_prompt(self._fit, p, self.answer) for p in parts_list]

    def _segments(self, prompts, groups) -> list[Segment]:
        segments = build_segments(prompts, groups, self.max_rows_per_segment, self.share_prefix)
        self.stats.rows += len(prompts)
        self.stats.prompt_tokens += sum(map(len, prompts))
        shared = build_segments(prompts, groups, max_rows=len(prompts) or 1, share_prefix=True)
        self.stats.floor_tokens += sum(s.n_tokens for s in shared)
        return segments

    def _forward(self, pack) -> torch.Tensor:
        self.stats.forward_passes += 1
        self.stats.tokens_processed += sum(s.n_tokens for s in pack)
        return last_token_logits(self.model, pack, self.device)

    # -- scoring mode
    def score(self, prompts: Sequence[Sequence[int]], groups: Sequence) -> pd.DataFrame:
        """p1..p5 (renormalised over the five), rating_mass (their share of all next-token mass),
        expected_rating and argmax_rating, one row per prompt in input order."""
        probs = np.zeros((len(prompts), 5))
        mass = np.zeros(len(prompts))
        ids = torch.tensor(self.answer.rating_ids)
        packs = pack_segments(self._segments(prompts, groups), self.token_budget)
        for pack in tqdm(packs, desc="scoring", unit="pass", disable=not self.progress, leave=False):
            logprobs = torch.log_softmax(self._forward(pack), dim=-1)[:, ids]
            rows = [r for seg in pack for r in seg.rows]
            mass[rows] = logprobs.exp().sum(-1).numpy()
            probs[rows] = torch.softmax(logprobs, dim=-1).numpy()
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
        n = len(prompts)
        generated: list[list[int]] = [[] for _ in range(n)]
        rngs = [row_generator(gen.seed, k) for k in keys]
        done = np.zeros(n, dtype=bool)
        stops = set(self.answer.stop_ids)
        packs = pack_segments(self._segments(prompts, groups), self.token_budget)
        bar = tqdm(total=n, desc="generating", unit="row", disable=not self.progress, leave=False)
        for pack in packs:
            rows = [r for seg in pack for r in seg.rows]

            def step(logits, rows=rows):
                logits = top_p_filter(logits, gen.top_p, gen.temperature)
                q = torch.cat([draw_q(self._vocab, rngs[r]) for r in rows])
                ids = tt_sample(logits, temperature=gen.temperature, top_k=gen.top_k, q=q)[:, 0].tolist()
                for r, t in zip(rows, ids):
                    if not done[r]:
                        generated[r].append(int(t))
                        done[r] = t in stops
                return ids, bool(done[rows].all())

            self.stats.forward_passes += 1
            self.stats.tokens_processed += generate_pack(self.model, pack, step, gen.max_new_tokens, self.device)
            bar.update(len(rows))
        bar.close()
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
    vocab = model.tok_embeddings.num_embeddings
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


def nan_to_none(x: float):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


# ---------------------------------------------------------------- rows in, predictions out

MODES = ("scoring", "paper")
PREDICTION_COLUMNS = [
    "mode", "raw_text", "parsed_rating", "expected_rating", "argmax_rating", *PROB_COLUMNS,
    "rating_mass", "prediction",
]


def check_modes(mode: str) -> list[str]:
    modes = list(MODES) if mode == "both" else [mode]
    if any(m not in MODES for m in modes):
        raise ConfigError(f"mode must be scoring, paper or both, got {mode!r}")
    return modes


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
