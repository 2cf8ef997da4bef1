"""Item metadata (summary, cast) for the item texts: DBpedia abstracts or a table of your own.

Formats of ``--meta-file``:

- JSON object ``{item_id: "abstract"}`` (e.g. ml1m_dbpedia_abstracts.json) or
  ``{item_id: {"summary": "...", "cast": ["A", "B"] or "A, B"}}``;
- CSV/TSV/Parquet with columns ``item_id``, ``summary`` and optionally ``cast``.

For plain abstracts, the cast is read from the "starring A, B and C" / "It stars A, B and C"
phrase when there is one (a heuristic: DBpedia has no cast field), and the summary is the abstract
cut to ``summary_words`` words. Placeholders are dropped: "Abstract not found." and the stand-ins
of the form "Movie: <title>, Genres: [...]" that ml1m_dbpedia_abstracts.json holds for 359 ids.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd

from persona_tune.data.loaders import _read_table, read_text
from persona_tune.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_SUMMARY_WORDS = 60
MAX_CAST = 8
_PLACEHOLDER = re.compile(r"^\s*(Abstract not found\.?|Movie: .*, Genres: \[.*\])\s*$", re.S)
_STARRING = re.compile(
    r"\b(?:co-starring|starring|stars|starred)\s+(.+?)(?=\.\s|\.$|;|\s\(|\s+as\s|\s+in\s+(?:the|a|an|his|her)\s|$)"
)
_NAME = re.compile(r"^[A-Z][\w.'\-]*(?:\s+[A-Z][\w.'\-]*){0,4}$")


def truncate_words(text: str, n_words: int) -> str:
    """Cut ``text`` to its first ``n_words`` words (ending with "..." when cut); 0 keeps it whole."""
    words = text.split()
    if n_words <= 0 or len(words) <= n_words:
        return " ".join(words)
    return " ".join(words[:n_words]).rstrip(",;:") + " ..."


def cast_from_abstract(abstract: str, limit: int = MAX_CAST) -> list[str]:
    """The names after "starring"/"stars" in an abstract, e.g. "... starring Liv Tyler, Joseph Fiennes, and
    Jeremy Irons." -> ["Liv Tyler", "Joseph Fiennes", "Jeremy Irons"]."""
    m = _STARRING.search(abstract)
    if not m:
        return []
    names = []
    for part in re.split(r",\s*(?:and\s+)?|\s+and\s+", m.group(1)):
        part = part.strip()
        if _NAME.match(part):
            names.append(part)
    return names[:limit]


def load_metadata(path: str | Path, summary_words: int = DEFAULT_SUMMARY_WORDS) -> pd.DataFrame:
    """Return item_id (int64), summary (str), cast (str, ", "-joined) for every usable entry of ``path``."""
    path = Path(path)
    records = []
    if path.suffix.lower() == ".json":
        text = read_text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg}", path, e.lineno) from None
        if not isinstance(data, dict):
            raise DataError("expected a JSON object {item_id: abstract or {summary, cast}}", path)
        for key, value in data.items():
            try:
                item_id = int(key)
            except ValueError:
                raise DataError(f"key {key!r} is not an integer item id", path) from None
            if isinstance(value, str):
                summary, cast = value, None
            elif isinstance(value, dict):
                summary, cast = str(value.get("summary") or ""), value.get("cast")
            else:
                raise DataError(f"item {item_id}: expected a string or an object, got {type(value).__name__}", path)
            records.append((item_id, summary, cast))
    else:
        df, first, row_word = _read_table(path, None)
        if "item_id" not in df.columns or "summary" not in df.columns:
            raise DataError(f"needs columns item_id and summary (optionally cast); has {list(df.columns)}", path)
        for i, row in enumerate(df.itertuples(index=False)):
            raw = str(getattr(row, "item_id"))
            try:
                item_id = int(float(raw))
            except ValueError:
                line = first + i if row_word == "line" else None
                raise DataError(f"item_id {raw!r} is not an integer", path, line) from None
            cast = getattr(row, "cast", None) if "cast" in df.columns else None
            records.append((item_id, "" if pd.isna(row.summary) else str(row.summary), cast))

    rows, n_placeholder = [], 0
    for item_id, summary, cast in records:
        if _PLACEHOLDER.match(summary):
            n_placeholder += 1
            summary = ""
        if cast is None or (not isinstance(cast, list) and pd.isna(cast)):
            names = cast_from_abstract(summary) if summary else []
        elif isinstance(cast, list):
            names = [str(c).strip() for c in cast if str(c).strip()]
        else:
            names = [c.strip() for c in str(cast).split(",") if c.strip()]
        rows.append({"item_id": item_id, "summary": truncate_words(summary, summary_words),
                     "cast": ", ".join(names[:MAX_CAST])})
    if n_placeholder:
        log.info("%s: %d placeholder entries ignored", path, n_placeholder)
    meta = pd.DataFrame(rows, columns=["item_id", "summary", "cast"]).astype({"item_id": "int64"})
    if meta["item_id"].duplicated().any():
        raise DataError(f"item id {int(meta.loc[meta['item_id'].duplicated(), 'item_id'].iat[0])} appears twice", path)
    return meta


def attach_metadata(items: pd.DataFrame, meta: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Fill items' summary and cast from ``meta`` (entries for unknown items are counted and ignored)."""
    unknown = ~meta["item_id"].isin(items["item_id"])
    if unknown.all():
        raise DataError("none of its item ids is in the item table: is it the metadata of another dataset?", path)
    if unknown.any():
        log.warning("%s: %d entries for items not in the item table ignored", path, int(unknown.sum()))
    out = items.drop(columns=["summary", "cast"]).merge(meta, on="item_id", how="left")
    out["summary"] = out["summary"].fillna("").astype(str)
    out["cast"] = out["cast"].fillna("").astype(str)
    return out[items.columns]


def render_item_text(title: str, year, genres: str, hist_avg: float, summary: str = "", cast: str = "",
                     noun: str = "movie") -> str:
    """The item description of the paper's prompts, e.g. "The movie Big Lebowski, The was released
    in the year 1998 is of Comedy, Crime genre with historical average rating of 3.74."."""
    text = f"The {noun} {title}"
    if year is not None and not pd.isna(year):
        text += f" was released in the year {int(year)}"
    parts = [g for g in genres.split("|") if g]
    if parts:
        text += f" is of {', '.join(parts)} genre"
    if hist_avg is not None and not pd.isna(hist_avg):
        text += f" with historical average rating of {hist_avg:.2f}."
    else:
        text += " with no historical ratings yet."
    if summary:
        text += f" Summary: {summary}"
    if cast:
        text += f" Cast: {cast}."
    return text


def render_items(items: pd.DataFrame, stats: pd.DataFrame, noun: str = "movie") -> pd.DataFrame:
    """The items table's columns from the item metadata and (item_id, hist_avg, hist_count) ``stats``."""
    items = items.drop(columns=["hist_avg", "hist_count", "text"], errors="ignore")
    items = items.merge(stats[stats["hist_count"] > 0] if len(stats) else stats, on="item_id", how="left")
    items = items.sort_values("item_id").reset_index(drop=True)
    items["hist_avg"] = items["hist_avg"].astype("float64")
    items["hist_count"] = items["hist_count"].fillna(0).astype("int64")
    items["text"] = [
        render_item_text(t, y, g, a, s, c, noun)
        for t, y, g, a, s, c in zip(items["title"], items["year"], items["genres"], items["hist_avg"],
                                    items["summary"], items["cast"])
    ]
    cols = ["item_id", "title", "year", "genres", "hist_avg", "hist_count", "summary", "cast", "text"]
    items = items[cols]
    items["year"] = items["year"].astype("Int64")
    for col in ("title", "genres", "summary", "cast", "text"):
        items[col] = items[col].astype(str)
    return items
