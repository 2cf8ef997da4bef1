"""The frozen-trunk training path: adapt the top layers of a model on cached lower-layer outputs.

The lower ``L - N`` layers of the base model never change (their LoRA is not trained), so their
output for a prompt is the same in every epoch, for every variant of a run (each persona, single
min/max, each objective) and at evaluation. The recipe ``lora_frozen_trunk`` computes it once per
prompt, stores it in a :class:`TrunkCache`, and then trains only the top ``N`` layers' LoRA and a
rating head on it. One trunk pass over the test rows serves the evaluation of every cell.

The cache. One folder per (model weights, model builder, split layer, storage dtype); one file per
user inside it. A user's rows share a prompt prefix (the system prompt and the start of the user
turn): it runs once, and each row adds only its suffix (persona_tune.evaluation.engine's shared
prefix batching, stopped at the split layer). A row is found by the hash of its prompt tokens, so a
changed prompt, template, memory or tokenizer is a different row and is computed afresh; a changed
model is a different folder. Nothing is reused silently. A user's file holds several prefix groups:
rows of another prompt variant (memory mode, template) that do not start with a stored prefix get a
group of their own, so variants coexist and each costs only its own rows. Users are written
atomically one by one, so a stopped build resumes.

The rating head trained beside the top layers' LoRA is persona_tune/evaluation/head.py (the evaluation
engine reads it too, so it lives beside the engine and imports nothing of this module).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import MultiHeadAttention, TransformerSelfAttentionLayer
from tqdm.auto import tqdm

from persona_tune.errors import ConfigError, check_choice
from persona_tune.evaluation.engine import (
    RATING_VALUES,
    _delete_caches,
    common_prefix_len,
    plan_batches,
    prefill_prefix,
    run_suffixes,
    shared_prefix_len,
)
from persona_tune.evaluation.head import RatingHead
from persona_tune.runfolder import atomic_path, atomic_write_json, load_torch, read_or_discard

OBJECTIVES = ("ce", "mse", "ce+mse")
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def split_layer(model: nn.Module, adapted_layers: int) -> int:
    """Index of the first adapted layer: the top ``adapted_layers`` of the model's layers."""
    n = len(model.layers)
    if not 1 <= adapted_layers <= n:
        raise ConfigError(f"adapted_layers must be between 1 and {n} (the model's layers), got {adapted_layers}")
    return n - adapted_layers


def _row_hash(tokens: Sequence[int]) -> str:
    return hashlib.sha1(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()


class TrunkCache:
    """Lower-layer outputs of prompts, per user (see the module docstring).

    A user's file: ``{"groups": [{"prefix_tokens", "prefix" [P, D], "rows": {hash: (suffix tokens,
    suffix states [L, D])}}, ...]}``; a file of the first format (one group at the top level) still reads.
    """

    def __init__(self, root: str | Path, spec: dict, storage_dtype: str = "fp16"):
        self.dtype = STORAGE_DTYPES[check_choice("trunk_cache.dtype", storage_dtype, tuple(STORAGE_DTYPES))]
        self.spec = {**spec, "storage_dtype": storage_dtype}
        key = hashlib.sha256(json.dumps(self.spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.dir = Path(root) / key
        self._shards: dict[int, dict] = {}
        self._where: dict[int, dict[str, int]] = {}  # user -> row hash -> group index

    def _path(self, user: int) -> Path:
        return self.dir / f"user_{int(user)}.pt"

    def _shard(self, user: int) -> dict:
        if user not in self._shards:
            path = self._path(user)
            # A truncated shard (a full disk, a kill during a copy) is named, removed and recomputed.
            shard = read_or_discard(path, load_torch, "trunk-cache shard")
            if not isinstance(shard, dict):
                shard = {"groups": []}
            if "groups" not in shard:
                shard = {"groups": [shard]}
            self._shards[user] = shard
            self._where[user] = {h: g for g, group in enumerate(shard["groups"]) for h in group["rows"]}
        return self._shards[user]

    def _group_of(self, user: int, tokens: Sequence[int]) -> int | None:
        self._shard(user)
        return self._where[user].get(_row_hash(tokens))

    def missing(self, prompts: Sequence[Sequence[int]], users: Sequence[int]) -> int:
        """How many of these rows the cache does not hold yet."""
        return sum(self._group_of(int(u), t) is None for t, u in zip(prompts, users))

    @torch.inference_mode()
    def build(self, model: nn.Module, split: int, prompts: Sequence[Sequence[int]], users: Sequence[int],
              batch_size: int = 16, token_budget: int = 8192, progress: bool = True, device="cpu") -> dict:
        """Compute and store the split-layer output of every row the cache lacks; returns counts."""
        self.dir.mkdir(parents=True, exist_ok=True)
        spec_file = self.dir / "spec.json"
        if not spec_file.is_file():
            atomic_write_json(spec_file, self.spec)
        todo: dict[int, dict[str, list[int]]] = {}
        for tokens, user in zip(prompts, users):
            if self._group_of(int(user), tokens) is None:
                todo.setdefault(int(user), {})[_row_hash(tokens)] = list(tokens)
        computed = tokens_run = 0
        bar = tqdm(total=sum(len(r) for r in todo.values()), desc="trunk cache", unit="row",
                   disable=not progress or not todo, leave=False)
        for user, wanted in todo.items():
            groups = self._shard(user)["groups"]
            placed: dict[int, dict[str, list[int]]] = {}  # group index -> its new rows
            for h, tokens in wanted.items():
                fits = [g for g, group in enumerate(groups) if _starts_with(tokens, group["prefix_tokens"])]
                if fits:
                    placed.setdefault(max(fits, key=lambda g: len(groups[g]["prefix_tokens"])), {})[h] = tokens
            unplaced = {h: t for h, t in wanted.items() if not any(h in rows for rows in placed.values())}
            if unplaced:  # another prompt variant: a group of its own, on the prefix its rows share
                prefix = next(iter(unplaced.values()))[: shared_prefix_len(list(unplaced.values()))]
                groups.append({"prefix_tokens": list(prefix), "prefix": None, "rows": {}})
                placed[len(groups) - 1] = unplaced
            for g, rows in placed.items():
                group = groups[g]
                prefix_len = len(group["prefix_tokens"])
                hidden: list[torch.Tensor] = []
                kv = prefill_prefix(model, group["prefix_tokens"], device, n_layers=split, hidden=hidden) \
                    if prefix_len else None
                if group["prefix"] is None:
                    group["prefix"] = (hidden[0] if hidden else torch.zeros(0, model.norm.scale.shape[0])).to(self.dtype).cpu()
                tokens_run += prefix_len
                hashes, suffixes = list(rows), [t[prefix_len:] for t in rows.values()]
                _, batches = plan_batches(suffixes, [0] * len(suffixes), batch_size, token_budget, share_prefix=False)
                for batch in batches:
                    try:
                        out = run_suffixes(model, [kv] * len(batch.rows), batch.suffixes, 0, device, split)
                        for b, r in enumerate(batch.rows):
                            group["rows"][hashes[r]] = (suffixes[r], out.h[b, : len(suffixes[r])].to(self.dtype).cpu())
                        tokens_run += out.h.shape[0] * out.h.shape[1]
                    finally:
                        _delete_caches(model)
                    bar.update(len(batch.rows))
                computed += len(rows)
            with atomic_path(self._path(user)) as tmp:
                torch.save(self._shards[user], tmp)
            self._where[user] = {h: g for g, group in enumerate(groups) for h in group["rows"]}
        bar.close()
        return {"rows_computed": computed, "tokens_run": tokens_run, "rows_requested": len(prompts)}

    def tree(self, user: int, prompts: Sequence[Sequence[int]],
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One user's prefix states [P, D] shared by ``prompts`` and each one's suffix states [L_i, D].

        Rows of different prefix groups are joined on the prefix their groups share: a row's states
        past it are its group's prefix states followed by its own (the trunk is causal, so a
        position's state depends only on the tokens up to it)."""
        user = int(user)
        where = [self._group_of(user, t) for t in prompts]
        if any(g is None for g in where):
            raise ConfigError(f"the trunk cache {self.dir} lacks rows of user {user}: build it first")
        groups = self._shard(user)["groups"]
        used = sorted(set(where))
        common = len(groups[used[0]]["prefix_tokens"]) if len(used) == 1 else \
            common_prefix_len([groups[g]["prefix_tokens"] for g in used])
        suffixes = []
        for tokens, g in zip(prompts, where):
            group = groups[g]
            own = group["rows"][_row_hash(tokens)][1]
            suffixes.append((torch.cat([group["prefix"][common:], own]) if len(group["prefix_tokens"]) > common
                             else own).to(dtype))
        return groups[used[0]]["prefix"][:common].to(dtype), suffixes

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("*.pt")) if self.dir.is_dir() else 0


def _starts_with(tokens: Sequence[int], prefix: Sequence[int]) -> bool:
    """``prefix`` is a proper prefix of ``tokens`` (the row keeps at least its answer position)."""
    return len(prefix) < len(tokens) and list(tokens[: len(prefix)]) == list(prefix)


@dataclass
class Trees:
    """A batch of "trees": per tree, one user's shared prefix followed by several of that user's row
    suffixes, each suffix attending to the prefix and causally to itself only. One pass through the
    adapted layers thus runs a user's prefix once for all the rows of the tree, with the same
    outputs as running each row alone (same positions, same visible tokens)."""

    states: torch.Tensor  # [B, T, D]
    mask: torch.Tensor  # [B, T, T], additive
    positions: torch.Tensor  # [B, T]
    answers: list[tuple[int, int]]  # (tree, index) of each row's answer position, in row order
    tokens: int  # tokens in the batch, padding excluded


def make_trees(groups: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor]]]) -> Trees:
    """``groups``: (prefix states [P, D], [suffix states [L_i, D], ...]) per tree."""
    lengths = [p.shape[0] + sum(x.shape[0] for x in sfx) for p, sfx in groups]
    T, dim = max(lengths), groups[0][0].shape[1]
    dtype = groups[0][0].dtype
    states = torch.zeros(len(groups), T, dim, dtype=dtype)
    visible = torch.eye(T, dtype=torch.bool).repeat(len(groups), 1, 1)  # padding sees itself (no NaN)
    positions = torch.zeros(len(groups), T, dtype=torch.long)
    answers = []
    for b, (prefix, suffixes) in enumerate(groups):
        P = prefix.shape[0]
        states[b, :P] = prefix
        visible[b, :P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
        positions[b, :P] = torch.arange(P)
        at = P
        for sfx in suffixes:
            L = sfx.shape[0]
            states[b, at:at + L] = sfx
            visible[b, at:at + L, :P] = True
            visible[b, at:at + L, at:at + L] = torch.ones(L, L, dtype=torch.bool).tril()
            positions[b, at:at + L] = P + torch.arange(L)
            answers.append((b, at + L - 1))
            at += L
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
    return Trees(states, mask, positions, answers, sum(lengths))


def full_layer_at_answers(layer: nn.Module, h: torch.Tensor, trees: Trees) -> torch.Tensor:
    """``layer`` over every position of the trees, read at the answer positions ([n, D])."""
    at = torch.tensor(trees.answers)
    return layer(h, mask=trees.mask, input_pos=trees.positions)[at[:, 0], at[:, 1]]


def last_layer_at_answers(layer: nn.Module, h: torch.Tensor, trees: Trees) -> torch.Tensor:
    """The model's last layer, output at the answer positions only ([n, D], rows in the order of
    ``trees.answers``). Its keys and values still cover every position; its queries, output projection
    and MLP run at the n answers, since nothing reads the rest of its output. The same numbers as
    ``layer(h, ...)`` at those positions (tested), for about a sixteenth of a layer's cost at every
    other position (SmolLM2)."""
    if not isinstance(layer, TransformerSelfAttentionLayer) or layer.attn.kv_cache is not None:
        return full_layer_at_answers(layer, h, trees)
    at = torch.tensor(trees.answers)
    B = h.shape[0]
    counts = torch.bincount(at[:, 0], minlength=B)
    slot = torch.arange(len(at)) - (counts.cumsum(0) - counts)[at[:, 0]]  # answers are in tree order
    index = torch.zeros(B, int(counts.max()), dtype=torch.long)  # padding slots read position 0
    index[at[:, 0], slot] = at[:, 1]

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    normed = layer.sa_norm(h)
    attended = _attend(layer.attn, rows(normed), trees.positions.gather(1, index), normed, trees.positions,
                       rows(trees.mask))
    h = rows(h) + layer.sa_scale(attended)
    h = h + layer.mlp_scale(layer.mlp(layer.mlp_norm(h)))
    return h[at[:, 0], slot]


def _attend(attn: MultiHeadAttention, x: torch.Tensor, x_positions: torch.Tensor, y: torch.Tensor,
            y_positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """torchtune's MultiHeadAttention.forward (no KV cache) with queries ``x`` at their own positions."""
    b, s_x, _ = x.shape
    q = attn.q_proj(x).view(b, s_x, attn.num_heads, attn.head_dim)
    k = attn.k_proj(y).view(b, y.shape[1], -1, attn.head_dim)
    v = attn.v_proj(y).view(b, y.shape[1], -1, attn.head_dim)
    if attn.pos_embeddings is not None:
        q = attn.pos_embeddings(q, input_pos=x_positions)
        k = attn.pos_embeddings(k, input_pos=y_positions)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if attn.q_norm is not None:
        q = attn.q_norm(q)
    if attn.k_norm is not None:
        k = attn.k_norm(k)
    if attn.num_heads != attn.num_kv_heads:
        k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
        v = v.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
    out = attn._attention_call(q, k, v, mask=mask, dropout_p=attn.attn_dropout if attn.training else 0.0,
                               is_causal=False)
    return attn.output_proj(out.transpose(1, 2).contiguous().view(b, s_x, -1))


def top_forward(model: nn.Module, split: int, trees: Trees, head: RatingHead | None = None,
                priors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapted layers over a batch of trees; returns (logits [n, V] at each row's answer position,
    the normed features [n, D] there), rows in the order of ``trees.answers`` (``priors`` too)."""
    h = trees.states
    *body, last = model.layers[split:]
    for layer in body:
        h = layer(h, mask=trees.mask, input_pos=trees.positions)
    h = model.norm(last_layer_at_answers(last, h, trees))
    logits = model.output(h).float()
    if head is not None:
        logits = head(h, logits, priors)
    return logits, h


def rating_loss(logits: torch.Tensor, ratings: torch.Tensor, rating_ids: torch.Tensor, objective: str) -> torch.Tensor:
    """ce: cross-entropy of the rating token over the whole vocabulary (the paper's loss at the answer);
    mse: squared error of the expected rating over the five rating tokens; ce+mse: their sum."""
    loss = logits.new_zeros(())
    if "ce" in objective.split("+"):
        loss = loss + F.cross_entropy(logits, rating_ids[ratings - 1])
    if "mse" in objective.split("+"):
        probs = torch.softmax(logits[:, rating_ids], dim=-1)
        expected = probs @ torch.tensor(RATING_VALUES, dtype=probs.dtype, device=probs.device)
        loss = loss + F.mse_loss(expected, ratings.to(probs.dtype))
    return loss


def tree_batches(users: Sequence[int], rows_per_tree: int, trees_per_step: int, seed: int,
                 epoch: int = 0, shuffle: bool = True) -> list[list[list[int]]]:
    """Row indices grouped into trees (up to ``rows_per_tree`` rows of one user) and steps (up to
    ``trees_per_step`` trees). Shuffled by (seed, epoch) only, so a resumed epoch sees the same order."""
    rng = np.random.default_rng([seed, epoch])
    by_user: dict[int, list[int]] = {}
    for i, u in enumerate(users):
        by_user.setdefault(int(u), []).append(i)
    trees = []
    for rows in by_user.values():
        rows = list(rng.permutation(rows)) if shuffle else rows
        trees += [[int(r) for r in rows[i:i + rows_per_tree]] for i in range(0, len(rows), rows_per_tree)]
    if shuffle:
        trees = [trees[i] for i in rng.permutation(len(trees))]
    return [trees[i:i + trees_per_step] for i in range(0, len(trees), trees_per_step)]


@torch.no_grad()
def features_and_logits(model: nn.Module, split: int, load_trees, steps: Sequence[Sequence[Sequence[int]]],
                        n_rows: int, rating_ids: torch.Tensor, head: RatingHead | None = None,
                        priors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normed answer-position features [n, D], and per row the logits of the five rating tokens plus,
    as a sixth column, the log of the rest of the vocabulary's mass [n, 6]. ``load_trees(step)``
    makes the Trees of one step of ``steps`` (tree_batches without shuffling)."""
    f = z = None
    for step in steps:
        idx = [r for tree in step for r in tree]
        out, h = top_forward(model, split, load_trees(step), head,
                             None if priors is None else torch.from_numpy(priors[idx]))
        if f is None:
            f = np.zeros((n_rows, h.shape[1]), dtype=np.float32)
            z = np.zeros((n_rows, 6), dtype=np.float64)
        f[idx] = h.float().numpy()
        rest = out.clone()
        rest[:, rating_ids] = float("-inf")
        z[idx, :5] = out[:, rating_ids].double().numpy()
        z[idx, 5] = torch.logsumexp(rest, dim=-1).double().numpy()
    return f, z
