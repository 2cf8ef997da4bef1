"""The classical simulator: the bias baseline (persona_tune.evaluation.baselines) used as a rater.

Its point prediction is m = mu + b_u + b_i, fit as `persona-tune baselines` fits it. A rating
distribution comes from a Gaussian residual model: rating = m + e, e ~ N(0, sigma^2), sigma the
root mean square of (rating - m) over the run's train rows (in-sample, so slightly optimistic).
The rating scale's cut points 1.5, 2.5, 3.5, 4.5 discretise it:

    p_k = Phi((k + 0.5 - m) / sigma) - Phi((k - 0.5 - m) / sigma),  p_1 and p_5 take the open tails,
    p_like = p(rating >= 4) = 1 - Phi((3.5 - m) / sigma),  expected_rating = sum_k k p_k.

So every simulator hands the fidelity metrics the same columns: expected rating, p_like, p1..p5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm

from persona_tune.history import BaselineConfig, Bias, History
from persona_tune.simulate.fidelity import PROB_COLUMNS

CUTS = np.array([1.5, 2.5, 3.5, 4.5])


@dataclass
class BiasRater:
    bias: Bias
    sigma: float

    @classmethod
    def fit(cls, train: pd.DataFrame, items: pd.DataFrame, cfg: BaselineConfig | None = None,
            history: History | None = None) -> "BiasRater":
        """``history``: the run's (History.load; its user buckets decide each row's item terms), else
        all_time from ``items``."""
        cfg = cfg or BaselineConfig()
        bias = (history or History.from_items(items)).fit_bias(train, cfg.lambda_item, cfg.lambda_user)
        fitted = bias.predict(train["user_id"], train["item_id"])
        sigma = float(np.sqrt(np.mean((train["rating"].to_numpy(float) - fitted) ** 2)))
        return cls(bias, max(sigma, 1e-3))

    def rate(self, user_ids, item_ids) -> pd.DataFrame:
        """expected_rating, p_like, p1..p5 and bias_prediction (m) for each (user, item)."""
        m = self.bias.predict(user_ids, item_ids)
        return rating_distribution(m, self.sigma)


def rating_distribution(m: np.ndarray, sigma: float) -> pd.DataFrame:
    """The discretised Gaussian of the module docstring, one row per point prediction ``m``."""
    m = np.asarray(m, dtype=float)
    cdf = norm.cdf((CUTS[None, :] - m[:, None]) / sigma)  # [n, 4]
    edges = np.concatenate([np.zeros((len(m), 1)), cdf, np.ones((len(m), 1))], axis=1)
    probs = np.diff(edges, axis=1)
    out = pd.DataFrame(probs, columns=PROB_COLUMNS)
    out["expected_rating"] = probs @ np.arange(1, 6)
    out["p_like"] = probs[:, 3] + probs[:, 4]
    out["bias_prediction"] = m
    return out
