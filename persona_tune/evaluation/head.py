"""The rating head: a learned linear correction to the logits of the five rating tokens.

The logits of the five rating tokens "1".."5" get a learned linear correction ``W h + b`` on top of
the tied output layer (``h``: the final normed state at the answer position); all other tokens keep
the base model's logits. ``init: closed_form`` fits ``W, b`` before training by multinomial logistic
regression of the rating on the frozen features (the L2 weights chosen by cross-validation over
users), so training starts from the best linear read-out rather than from the marginal; ``zero``
starts at the base model; ``none`` has no head (the paper's model).

It is trained by the frozen-trunk recipe (persona_tune/trunk.py has the training pieces) and read
by the evaluation engine (persona_tune/evaluation/loading.py puts a saved head on the model as
``HeadedOutput``; predict.py feeds it each row's stated numbers through ``prior_features``). This
module imports neither of them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from persona_tune.errors import ConfigError, check_choice
from persona_tune.runfolder import load_torch

HEAD_INITS = ("closed_form", "zero", "none")
HEAD_PRIORS = ("none", "stated", "collab")
# fit_head_closed_form's defaults of the numbers' L2 grid and of the folds (a config's head.prior_l2_grid, head.folds).
PRIOR_L2_GRID = (0.01, 1.0, 100.0)
FOLDS = 5
# How many numbers per row each head.prior reads (prior_features).
PRIOR_FEATURES = {"none": 0, "stated": 2, "collab": 3}
COLLAB_SHRINK = 1.0  # the kNN residual shrunk by weight / (weight + COLLAB_SHRINK): a third collab number


class RatingHead(nn.Module):
    """A learned linear correction to the logits of the five rating tokens (see the module docstring).

    With ``prior`` stated or collab the correction also reads each row's numbers as given in the
    prompt (prior_features): ``stated``, the item average + user offset and the item average;
    ``collab``, the bias baseline's expectation, the item-kNN prediction (expectation + the
    neighbours' residual) and the same with the residual shrunk by its evidence. Missing numbers (an item nobody rated) take the training rows' mean
    (``prior_fill``).
    """

    def __init__(self, dim: int, rating_ids: Sequence[int], prior: str = "none"):
        super().__init__()
        n_prior = PRIOR_FEATURES[check_choice("head.prior", prior, HEAD_PRIORS)]
        self.prior = prior
        self.register_buffer("rating_ids", torch.tensor(list(rating_ids), dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(torch.zeros(len(rating_ids), dim))
        self.bias = nn.Parameter(torch.zeros(len(rating_ids)))
        self.prior_weight = nn.Parameter(torch.zeros(len(rating_ids), n_prior))
        self.register_buffer("prior_fill", torch.zeros(n_prior))
        # Saved with the head, so an evaluation knows which numbers it reads (0 none, 1 stated, 2 collab).
        self.register_buffer("prior_kind", torch.tensor(HEAD_PRIORS.index(prior)))

    @property
    def n_prior(self) -> int:
        return self.prior_weight.shape[1]

    def forward(self, h: torch.Tensor, logits: torch.Tensor, priors: torch.Tensor | None = None) -> torch.Tensor:
        delta = h @ self.weight.T + self.bias
        if self.n_prior:
            if priors is None or priors.shape != (h.shape[0], self.n_prior):
                raise ConfigError(f"this rating head reads the {self.prior} numbers of each row ({self.n_prior} per row); "
                                  "evaluate it with prompts that state them (state_numbers: True, or "
                                  "collab_memories: k for head.prior: collab)")
            priors = torch.where(torch.isnan(priors), self.prior_fill.to(priors.dtype), priors)
            delta = delta + priors.to(h.dtype) @ self.prior_weight.T
        return logits.index_add(1, self.rating_ids, delta.to(logits.dtype))


def prior_features(parts: Sequence, prior: str = "stated") -> np.ndarray:
    """Per row from its PromptParts; NaN when unstated. ``stated``: (item average + user offset, item
    average); ``collab``: (the bias expectation e, the item-kNN prediction e + r, and e + r w / (w +
    COLLAB_SHRINK) with w the neighbours' similarity sum: a kNN residual trusted as far as its evidence)."""
    out = np.full((len(parts), PRIOR_FEATURES[prior]), np.nan)
    for i, p in enumerate(parts):
        if prior == "stated" and p.item_avg is not None:
            out[i] = (p.item_avg + (p.user_offset or 0.0), p.item_avg)
        elif prior == "collab" and p.collab_expected is not None:
            r, w = p.collab_residual or 0.0, p.collab_weight or 0.0
            out[i] = (p.collab_expected, p.collab_expected + r, p.collab_expected + r * w / (w + COLLAB_SHRINK))
    return out


class HeadedOutput(nn.Module):
    """A model's output layer followed by a rating head: ``model.output = HeadedOutput(model.output, head)``
    makes every use of the model (scoring, generation) see the head's rating logits."""

    def __init__(self, output: nn.Module, head: RatingHead):
        super().__init__()
        self.inner = output
        self.head = head
        self.enabled = True  # generation turns it off after the answer token (it rates the answer only)
        self.row_priors: torch.Tensor | None = None  # the batch's stated numbers, for a head that reads them

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.inner(h)
        if not self.enabled:
            return logits
        flat = self.head(h.reshape(-1, h.shape[-1]), logits.reshape(-1, logits.shape[-1]).float(), self.row_priors)
        return flat.to(logits.dtype).reshape(logits.shape)


def swap_output(model: nn.Module, output) -> object:
    """Put ``output`` in place of ``model.output`` and return the old one. torchtune's TiedLinear (tied
    embeddings, e.g. SmolLM2) is not a Module, so plain assignment cannot switch between the two."""
    old = model.output
    model._modules.pop("output", None)
    model.__dict__.pop("output", None)
    setattr(model, "output", output)
    return old


def load_rating_head(path: str | Path, dim: int) -> RatingHead:
    """A saved rating_head.pt (weight, bias; rating_ids are stored beside them)."""
    state = load_torch(path, hint="; retrain the adapter (`persona-tune train --force`)")
    n_prior = state["prior_weight"].shape[1] if "prior_weight" in state else 0
    # A head saved before prior_kind existed reads the stated numbers when it reads any.
    if "prior_kind" not in state:
        state["prior_kind"] = torch.tensor(HEAD_PRIORS.index("stated" if n_prior else "none"))
    head = RatingHead(dim, state["rating_ids"].tolist(), HEAD_PRIORS[int(state["prior_kind"])])
    head.load_state_dict({k: v for k, v in state.items() if k != "rating_ids"})
    return head


def user_folds(users: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Each row's fold, 0..k-1 with k = min(folds, distinct users): all of a user's rows in one fold,
    the users dealt round-robin to the folds in a seeded random order."""
    unique, inverse = np.unique(np.asarray(users), return_inverse=True)
    k = max(1, min(int(folds), len(unique)))
    fold_of_user = np.empty(len(unique), dtype=int)
    fold_of_user[np.random.default_rng(seed).permutation(len(unique))] = np.arange(len(unique)) % k
    return fold_of_user[inverse]


def fit_head_closed_form(head: RatingHead, output_weight: torch.Tensor, features: np.ndarray, ratings: np.ndarray,
                         base: np.ndarray, users: np.ndarray, l2_grid: Sequence[float] = (1.0, 100.0, 10000.0),
                         digit_mass: float = 0.9, seed: int = 0, priors: np.ndarray | None = None,
                         prior_l2_grid: Sequence[float] = PRIOR_L2_GRID, folds: int = FOLDS) -> dict:
    """Set the head so that the rating tokens' logits equal a multinomial logistic regression of the
    rating on the features (and the stated numbers, for a head that reads them), shifted so the five
    carry about ``digit_mass`` of the next-token mass.

    Features and numbers are standardized, and each block has its own L2 weight (sklearn's C = 1 / l2
    with the block's columns scaled to match): ``l2`` on the features from ``l2_grid``, ``prior_l2`` on
    the numbers from ``prior_l2_grid``. For a head that reads numbers the features' grid also holds
    infinity: the features off, i.e. the numbers-only read-out, so hundreds of weak feature directions
    can be switched off when they only add noise. The pair is chosen by the RMSE of the expected
    rating pooled over ``folds`` folds of users (each user's rows in one fold; on ties the stronger
    feature penalty); the final fit uses every row. The returned info says which pair won (``l2``:
    None when the features are off), the folds and every pair's cross-validated RMSE.
    ``base``: features_and_logits' [n, 6] logits of the base model.
    """
    from sklearn.linear_model import LogisticRegression

    ratings = ratings.astype(int)
    dim, n_prior = features.shape[1], head.n_prior
    columns = [features.astype(np.float64)]
    if n_prior:
        fill = np.nanmean(priors, axis=0)
        priors = np.where(np.isnan(priors), fill, priors)
        columns.append(priors)
        with torch.no_grad():
            head.prior_fill.copy_(torch.from_numpy(fill))
    z = np.hstack(columns)
    mean, scale = z.mean(0), z.std(0) + 1e-8
    x = (z - mean) / scale
    grid = [(float(lf), float(lp)) for lf in (*l2_grid, math.inf) for lp in prior_l2_grid] if n_prior \
        else [(float(lf), None) for lf in l2_grid]

    def design(lf: float, lp: float | None) -> tuple[np.ndarray, float]:
        """(per-column factor, C): C = 1 / lp with the features scaled by sqrt(lp / lf) puts L2 weight lf
        on the features' coefficients and lp on the numbers'; factor 0 drops a column."""
        if lp is None:
            return np.ones(dim), 1.0 / lf
        return np.r_[np.full(dim, 0.0 if math.isinf(lf) else math.sqrt(lp / lf)), np.ones(n_prior)], 1.0 / lp

    def inputs(lf: float, lp: float | None, mask: np.ndarray) -> tuple[np.ndarray, float]:
        """(the regression's inputs of the rows in ``mask``: the kept columns, scaled; C)."""
        factor, c = design(lf, lp)
        keep = factor > 0
        return x[mask][:, keep] * factor[keep], c

    def fit(lf: float, lp: float | None, mask: np.ndarray) -> LogisticRegression:
        rows, c = inputs(lf, lp, mask)
        return LogisticRegression(C=c, max_iter=500).fit(rows, ratings[mask])

    def expected(model: LogisticRegression, lf: float, lp: float | None, mask: np.ndarray) -> np.ndarray:
        return model.predict_proba(inputs(lf, lp, mask)[0]) @ model.classes_.astype(float)

    fold = user_folds(users, folds, seed)
    k = int(fold.max()) + 1 if len(fold) else 0
    scores = []
    for lf, lp in grid if k > 1 else ():
        out = np.full(len(ratings), np.nan)
        for f in range(k):
            held = fold == f
            if len(np.unique(ratings[~held])) > 1:
                out[held] = expected(fit(lf, lp, ~held), lf, lp, held)
        scored = ~np.isnan(out)
        if scored.any():
            scores.append({"l2": None if math.isinf(lf) else lf, "prior_l2": lp,
                           "rmse": float(np.sqrt(np.mean((out[scored] - ratings[scored]) ** 2)))})
    if scores:  # the lowest RMSE; on a tie the later pair in the grid (the stronger feature penalty)
        best = min(range(len(scores)), key=lambda i: (scores[i]["rmse"], -i))
        lf = math.inf if scores[best]["l2"] is None else scores[best]["l2"]
        lp = scores[best]["prior_l2"]
    else:
        lf = float(l2_grid[len(l2_grid) // 2])
        lp = float(prior_l2_grid[len(prior_l2_grid) // 2]) if n_prior else None
    info = {"l2": None if math.isinf(lf) else lf, "prior_l2": lp, "folds": k, "validation_rmse": scores}
    if len(np.unique(ratings)) < 2:
        return {**info, "skipped": "fewer than two distinct ratings"}
    everything = np.ones(len(ratings), dtype=bool)
    model = fit(lf, lp, everything)
    factor, _ = design(lf, lp)
    keep = np.flatnonzero(factor > 0)
    coef = np.full((5, x.shape[1]), 0.0)
    intercept = np.full(5, -30.0)  # a rating never seen in training gets ~0 probability
    for j, cls in enumerate(model.classes_):
        if len(model.classes_) == 2:  # sklearn's binary case has one row: logit of the second class
            coef[cls - 1, keep] = model.coef_[0] * factor[keep] * (j * 2 - 1) / 2
            intercept[cls - 1] = model.intercept_[0] * (j * 2 - 1) / 2
        else:
            coef[cls - 1, keep], intercept[cls - 1] = model.coef_[j] * factor[keep], model.intercept_[j]
    weight = coef / scale  # on raw features and numbers
    bias = intercept - weight @ mean
    target = z @ weight.T + bias  # [n, 5]
    lse_target = np.logaddexp.reduce(target, axis=1)
    shift = float(np.median(base[:, 5] - lse_target) + math.log(digit_mass / (1 - digit_mass)))
    rating_rows = output_weight[head.rating_ids].double().numpy()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight[:, :dim] - rating_rows).to(head.weight.dtype))
        head.bias.copy_(torch.from_numpy(bias + shift).to(head.bias.dtype))
        if n_prior:
            head.prior_weight.copy_(torch.from_numpy(weight[:, dim:]).to(head.prior_weight.dtype))
    train_rmse = float(np.sqrt(np.mean((expected(model, lf, lp, everything) - ratings) ** 2)))
    return {**info, "train_rmse": train_rmse}
