"""The recs format: what a recommender hands the simulator, and its validation.

A CSV (with a header) or Parquet file with one row per recommended item:

| column | type | meaning |
|---|---|---|
| recommender | string | the recommender's name (any text; unique per recommender) |
| user_id | int | a user of the run (one with train rows) |
| item_id | int | an item of the run's items.parquet |
| rank | int >= 1 | the item's position in that user's slate (1 = top) |

Extra columns (a ``score``, say) are ignored. Every check runs before anything is written, and the
first failure is one DataError naming the file and the line (CSV: the file's line, the header being
line 1) or row (Parquet: 1-based): unknown users or items, a duplicate (recommender, user, rank) or
(recommender, user, item), a rank that is not a positive integer, a number outside int64, missing
columns, an empty file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from persona_tune.errors import DataError

RECS_COLUMNS = ("recommender", "user_id", "item_id", "rank")


def _where(path: Path, csv: bool, index: int) -> dict:
    """DataError location of the row at 0-based ``index``: the CSV line (header = line 1) or the Parquet row."""
    return {"path": path, "line": index + 2} if csv else {"path": f"{path} (row {index + 1})"}


def read_recs_file(path: str | Path) -> tuple[pd.DataFrame, bool]:
    """The raw table (strings kept as read) and whether it is a CSV."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such recs file", path=path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError("a recs file must be .csv or .parquet", path=path)
    if path.stat().st_size == 0:
        raise DataError("empty file: expected the columns " + ", ".join(RECS_COLUMNS), path=path)
    csv = suffix == ".csv"
    try:
        table = (pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True) if csv
                 else pd.read_parquet(path))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as e:
        raise DataError(f"cannot read it: {str(e).splitlines()[0]}", path=path) from None
    return table, csv


INT64_LIMIT = 2.0 ** 63  # |value| below this fits int64


def _integers(table: pd.DataFrame, column: str, path: Path, csv: bool, minimum: int | None = None) -> np.ndarray:
    """The column as int64; the first value that is not an integer (>= ``minimum``) within int64 is a
    DataError naming its line (a rank of 10**30 would otherwise wrap to a negative number)."""
    raw = table[column]
    parsed = pd.to_numeric(raw.astype(str).str.strip() if raw.dtype == object else raw, errors="coerce")
    values = parsed.to_numpy(dtype=float)
    bad = ~np.isfinite(values) | (values != np.round(values))
    if minimum is not None:
        bad |= np.nan_to_num(values, nan=minimum) < minimum
    if parsed.dtype.kind == "i":  # parsed exactly as int64
        too_large = np.zeros(len(values), bool)
    elif parsed.dtype.kind == "u":
        too_large = parsed.to_numpy() > np.iinfo(np.int64).max
    else:
        too_large = np.abs(np.nan_to_num(values)) >= INT64_LIMIT
    if (bad | too_large).any():
        i = int(np.flatnonzero(bad | too_large)[0])
        if too_large[i] and not bad[i]:
            raise DataError(f"{column} {raw.iloc[i]!r} is out of range (a 64-bit integer, below 2**63)",
                            **_where(path, csv, i))
        need = f"an integer >= {minimum}" if minimum is not None else "an integer"
        raise DataError(f"{column} must be {need}, got {raw.iloc[i]!r}", **_where(path, csv, i))
    if parsed.dtype.kind in "iu":  # exact, also above 2**53 where a float would round
        return parsed.to_numpy(dtype=np.int64)
    return values.astype(np.int64)


def validate_recs(path: str | Path, users: Iterable[int], items: Iterable[int]) -> pd.DataFrame:
    """Read and check one recs file against the run's users and items (see the module docstring).

    Returns recommender, user_id, item_id, rank (int64), sorted by recommender, user, rank.
    """
    path = Path(path)
    table, csv = read_recs_file(path)
    missing = [c for c in RECS_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; a recs file has {', '.join(RECS_COLUMNS)}", path=path)
    if table.empty:
        raise DataError("empty file: no recommendation rows", path=path)
    names = table["recommender"].astype(str).str.strip()
    blank = (names == "") | table["recommender"].isna().to_numpy()
    if blank.any():
        raise DataError("recommender is empty", **_where(path, csv, int(np.flatnonzero(blank)[0])))
    out = pd.DataFrame({
        "recommender": names.to_numpy(),
        "user_id": _integers(table, "user_id", path, csv),
        "item_id": _integers(table, "item_id", path, csv),
        "rank": _integers(table, "rank", path, csv, minimum=1),
    })
    known_users = pd.Index(pd.unique(np.asarray(list(users), dtype=np.int64)))
    unknown = ~out["user_id"].isin(known_users).to_numpy()
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise DataError(f"unknown user {out['user_id'].iat[i]} (not a user of this run: no train rows); "
                        f"{int(unknown.sum())} row(s) like it", **_where(path, csv, i))
    known_items = pd.Index(pd.unique(np.asarray(list(items), dtype=np.int64)))
    unknown = ~out["item_id"].isin(known_items).to_numpy()
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise DataError(f"unknown item {out['item_id'].iat[i]} (not in items.parquet); "
                        f"{int(unknown.sum())} row(s) like it", **_where(path, csv, i))
    for key, what in ((["recommender", "user_id", "rank"], "rank"), (["recommender", "user_id", "item_id"], "item")):
        dup = out.duplicated(key, keep="first").to_numpy()
        if dup.any():
            i = int(np.flatnonzero(dup)[0])
            r = out.iloc[i]
            first = int(np.flatnonzero((out[key] == r[key]).all(axis=1).to_numpy())[0])
            first_at = f"line {first + 2}" if csv else f"row {first + 1}"
            raise DataError(f"duplicate (recommender, user, {what}) = ({r['recommender']!r}, {r['user_id']}, "
                            f"{r[what if what == 'rank' else 'item_id']}), first at {first_at}", **_where(path, csv, i))
    return out.sort_values(["recommender", "user_id", "rank"], kind="stable").reset_index(drop=True)


def load_recs(paths: Iterable[str | Path], users: Iterable[int], items: Iterable[int]) -> pd.DataFrame:
    """Every file validated, then joined; a recommender name may come from one file only."""
    users, items = list(users), list(items)
    frames, owner = [], {}
    for path in paths:
        recs = validate_recs(path, users, items)
        for name in recs["recommender"].unique():
            if name in owner:
                raise DataError(f"recommender {name!r} is also in {owner[name]}", path=path)
            owner[name] = str(path)
        frames.append(recs)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c != "recommender" else object) for c in RECS_COLUMNS})
    return pd.concat(frames, ignore_index=True)
