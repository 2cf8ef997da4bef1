"""The rating head: a learned linear correction to the logits of the five rating tokens.

The logits of the five rating tokens "1".."5" get a learned linear correction ``W h + b`` on top of
the tied output layer (``h``: the final normed state at the answer position); all other tokens keep
the base model's logits. ``init: closed_form`` fits ``W, b`` before training by multinomial logistic
regression of the rating on the frozen features (the L2 weight chosen on held-out users), so training
starts from the best linear read-out rather than from the marginal; ``zero`` starts at the base model;
``none`` has no head (the paper's model).

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


def fit_head_closed_form(head: RatingHead, output_weight: torch.Tensor, features: np.ndarray, ratings: np.ndarray,
                         base: np.ndarray, users: np.ndarray, l2_grid: Sequence[float] = (1.0, 100.0, 10000.0),
                         digit_mass: float = 0.9, seed: int = 0, priors: np.ndarray | None = None,
                         prior_scale: float = 10.0) -> dict:
    """Set the head so that the rating tokens' logits equal a multinomial logistic regression of the
    rating on the features (and the stated numbers, for a head that reads them), shifted so the five
    carry about ``digit_mass`` of the next-token mass.

    Features are standardized; the stated numbers are scaled up by ``prior_scale`` after that, so
    their L2 penalty is ``prior_scale``² times weaker than the features' (two well-known numbers
    against hundreds of weak directions). The L2 weight (sklearn's C = 1 / l2) is chosen by the RMSE
    of the expected rating on a fifth of the users held out; the final fit uses every row.
    ``base``: features_and_logits' [n, 6] logits of the base model.
    """
    from sklearn.linear_model import LogisticRegression

    ratings = ratings.astype(int)
    columns = [features.astype(np.float64)]
    if head.n_prior:
        fill = np.nanmean(priors, axis=0)
        priors = np.where(np.isnan(priors), fill, priors)
        columns.append(priors)
        with torch.no_grad():
            head.prior_fill.copy_(torch.from_numpy(fill))
    z = np.hstack(columns)
    mean, scale = z.mean(0), z.std(0) + 1e-8
    if head.n_prior:
        scale[-head.n_prior:] /= prior_scale
    x = (z - mean) / scale
    rng = np.random.default_rng(seed)
    unique = np.unique(users)
    held = np.isin(users, rng.choice(unique, size=max(1, len(unique) // 5), replace=False)) if len(unique) > 4 \
        else np.zeros(len(users), dtype=bool)

    def fit(c: float, mask: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=500).fit(x[mask], ratings[mask])

    def rmse(model: LogisticRegression, mask: np.ndarray) -> float:
        expected = model.predict_proba(x[mask]) @ model.classes_.astype(float)
        return float(np.sqrt(np.mean((expected - ratings[mask]) ** 2)))

    scores = {}
    if held.any() and len(np.unique(ratings[~held])) > 1:
        scores = {l2: rmse(fit(1.0 / l2, ~held), held) for l2 in l2_grid}
    l2 = min(scores, key=scores.get) if scores else l2_grid[len(l2_grid) // 2]
    if len(np.unique(ratings)) < 2:
        return {"l2": l2, "validation_rmse": scores, "skipped": "fewer than two distinct ratings"}
    model = fit(1.0 / l2, np.ones(len(ratings), dtype=bool))
    coef = np.full((5, x.shape[1]), 0.0)
    intercept = np.full(5, -30.0)  # a rating never seen in training gets ~0 probability
    for k, cls in enumerate(model.classes_):
        if len(model.classes_) == 2:  # sklearn's binary case has one row: logit of the second class
            coef[cls - 1] = model.coef_[0] * (k * 2 - 1) / 2
            intercept[cls - 1] = model.intercept_[0] * (k * 2 - 1) / 2
        else:
            coef[cls - 1], intercept[cls - 1] = model.coef_[k], model.intercept_[k]
    weight = coef / scale  # on raw features and numbers
    bias = intercept - weight @ mean
    target = z @ weight.T + bias  # [n, 5]
    lse_target = np.logaddexp.reduce(target, axis=1)
    shift = float(np.median(base[:, 5] - lse_target) + math.log(digit_mass / (1 - digit_mass)))
    dim = features.shape[1]
    rating_rows = output_weight[head.rating_ids].double().numpy()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight[:, :dim] - rating_rows).to(head.weight.dtype))
        head.bias.copy_(torch.from_numpy(bias + shift).to(head.bias.dtype))
        if head.n_prior:
            head.prior_weight.copy_(torch.from_numpy(weight[:, dim:]).to(head.prior_weight.dtype))
    return {"l2": l2, "validation_rmse": scores, "train_rmse": rmse(model, np.ones(len(ratings), dtype=bool))}
