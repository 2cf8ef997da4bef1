"""The chronological split of the paper's protocol: each user's ratings in time order (ties broken by
item id), the first floor(train_frac * n) for training and the rest for test. `prepare` applies it to
the sampled users; the references apply it to validation users."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def n_train_rows(n: int, train_frac: float) -> int:
    """How many of a user's n ratings go to training: floor(train_frac * n), at least 1 and at most n - 1."""
    return min(max(math.floor(train_frac * n + 1e-9), 1), n - 1)


def split_chronological(ratings: pd.DataFrame, users: np.ndarray, train_frac: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split each user's ratings in time order: the first floor(train_frac * n) train, the rest test."""
    cols = ["user_id", "item_id", "rating", "timestamp"]
    df = ratings.loc[ratings["user_id"].isin(users), cols]
    df = df.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    position = df.groupby("user_id").cumcount().to_numpy()
    n = df.groupby("user_id")["item_id"].transform("size").to_numpy()
    n_train = np.array([n_train_rows(int(k), train_frac) for k in n]) if len(n) else n
    is_train = position < n_train
    return df[is_train].reset_index(drop=True), df[~is_train].reset_index(drop=True)
