"""Loaders for MovieLens-1M, MovieLens-100K and generic CSV/Parquet rating logs, with validation.

Every loader returns a :class:`RatingLog` in one normalised form:

- ``ratings``: user_id, item_id, rating (int64, 1..5), timestamp (int64, unix seconds, >= 0);
- ``items``: item_id, title, year (nullable Int64), genres ("|"-joined str), summary, cast;
- ``users``: user_id plus whatever demographics the source has (or None).

Bad input raises :class:`~persona_tune.errors.DataError` naming the file and the 1-based line.
Parsing goes through pandas; when pandas rejects a file, a line-by-line pass finds the first bad
line and says what is wrong with it. Duplicate (user, item) pairs are an error by default;
``duplicates="keep-last"`` keeps the rating with the latest timestamp (the later line on a tie).
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from persona_tune.errors import ConfigError, DataError
from persona_tune.runfolder import file_sha256

log = logging.getLogger(__name__)

# The 18 MovieLens genres, in the order of ML-100K's u.genre (without "unknown").
ML_GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
    "Western",
)
RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
ITEM_COLUMNS = ["item_id", "title", "year", "genres", "summary", "cast"]
DUPLICATE_POLICIES = ("error", "keep-last")
MIN_YEAR, MAX_YEAR = 1870, 2100

_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")
_TRAILING_PAREN = re.compile(r"\(([^()]*)\)\s*$")


@dataclass
class RatingLog:
    """One rating log in normalised form, plus the sha256 of every file it was read from."""

    dataset: str
    ratings: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None = None
    inputs: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Reading text
# ---------------------------------------------------------------------------------------------


def read_text(path: str | Path) -> str:
    """Read a text file as UTF-8; a line that is not UTF-8 is read as latin-1 (the MovieLens files are
    latin-1), line by line, so one latin-1 line does not garble the UTF-8 ones (a warning names it).

    Rejects missing, empty, UTF-16 and binary files with a DataError; normalises CRLF to LF.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path)
    if path.is_dir():
        raise DataError("is a directory, expected a file", path)
    data = path.read_bytes()
    if not data.strip():
        raise DataError("file is empty", path)
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError("file is UTF-16 encoded; save it as UTF-8 (or latin-1) text", path)
    if b"\x00" in data:
        line = data.count(b"\n", 0, data.index(b"\x00")) + 1
        raise DataError("contains NUL bytes: a binary or UTF-16 file, expected UTF-8 or latin-1 text", path, line)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        lines, latin1, utf8_non_ascii = [], [], False
        for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
            try:
                lines.append(raw.decode("utf-8"))
                utf8_non_ascii = utf8_non_ascii or not raw.isascii()
            except UnicodeDecodeError:
                lines.append(raw.decode("latin-1"))
                latin1.append(number)
        text = "\n".join(lines)
        if utf8_non_ascii:  # both encodings in one file: say so (an all-latin-1 file is the MovieLens norm)
            log.warning("%s: mixed encodings: %d line(s) read as latin-1 (first: line %d), the others as UTF-8",
                        path, len(latin1), latin1[0])
    return text.replace("\r\n", "\n")


INT64_MAX = 2**63 - 1


def _check_int_field(value: str, name: str, path: Path, line: int) -> int:
    value = value.strip()
    try:
        number = int(value)
    except ValueError:
        pass
    else:
        if abs(number) > INT64_MAX:
            raise DataError(f"{name} {value} is too large (more than 64 bits)", path, line)
        return number
    try:
        as_float = float(value)
    except ValueError:
        raise DataError(f"{name} {value!r} is not an integer", path, line) from None
    if name == "rating" and as_float.is_integer():
        return int(as_float)
    raise DataError(f"{name} {value!r} is not an integer", path, line)


def _parse_int_table(path: Path, text: str, sep: str, names: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """Parse a headerless table of integers; return it and the 1-based line number of each row."""
    sep1 = sep if len(sep) == 1 else "\x1f"
    body = text if len(sep) == 1 else text.replace(sep, sep1)
    if not body.endswith("\n"):
        body += "\n"
    try:
        df = pd.read_csv(
            io.StringIO(body), sep=sep1, header=None, names=names, dtype="int64",
            skip_blank_lines=False, engine="c",
        )
        if df.shape[1] == len(names) and body.count("\n") == len(df):
            return df, np.arange(1, len(df) + 1)
    except (ValueError, OverflowError, pd.errors.ParserError):
        pass
    return _parse_int_table_slow(path, text, sep, names)


def _parse_int_table_slow(path: Path, text: str, sep: str, names: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    rows, lines = [], []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        parts = raw.split(sep)
        if len(parts) != len(names):
            raise DataError(
                f"expected {len(names)} fields ({', '.join(names)}) separated by {sep!r}, found {len(parts)}",
                path, lineno,
            )
        rows.append([_check_int_field(p, n, path, lineno) for p, n in zip(parts, names)])
        lines.append(lineno)
    if not rows:
        raise DataError("file has no data rows", path)
    return pd.DataFrame(rows, columns=names, dtype="int64"), np.asarray(lines)


def _split_lines(path: Path, text: str, sep: str, n_fields: int, what: str):
    """Yield (line number, fields) for each non-blank line, checking the field count."""
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        parts = raw.split(sep)
        if len(parts) != n_fields:
            raise DataError(f"expected {n_fields} fields ({what}) separated by {sep!r}, found {len(parts)}", path, lineno)
        yield lineno, parts


# ---------------------------------------------------------------------------------------------
# Validation shared by every loader
# ---------------------------------------------------------------------------------------------


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def validate_ratings(
    df: pd.DataFrame, lines: np.ndarray, path: Path, *, duplicates: str = "error", row_word: str = "line"
) -> tuple[pd.DataFrame, np.ndarray]:
    """Check ranges and duplicates of a parsed ratings table; return it (and its lines) with the duplicate policy applied.

    ``lines`` holds each row's 1-based line number in ``path`` (or row number for Parquet, with
    ``row_word="row"``), so every error points at the offending line.
    """
    if duplicates not in DUPLICATE_POLICIES:
        raise ConfigError(f"duplicates must be one of {DUPLICATE_POLICIES}, got {duplicates!r}")
    if len(df) == 0:
        raise DataError("no ratings", path)

    def fail(message: str, mask) -> None:
        i = _first(np.asarray(mask))
        if row_word == "line":
            raise DataError(message.format(**df.iloc[i].to_dict()), path, int(lines[i]))
        raise DataError(f"row {int(lines[i])}: " + message.format(**df.iloc[i].to_dict()), path)

    for col in ("user_id", "item_id"):
        if (df[col] < 0).any():
            fail(f"negative {col} {{{col}}}", df[col] < 0)
    bad = (df["rating"] < 1) | (df["rating"] > 5)
    if bad.any():
        fail("rating {rating} out of range 1-5", bad)
    if (df["timestamp"] < 0).any():
        fail("negative timestamp {timestamp}", df["timestamp"] < 0)

    dup = df.duplicated(["user_id", "item_id"], keep="first").to_numpy()
    if dup.any():
        if duplicates == "error":
            i = _first(dup)
            u, it = int(df["user_id"].iat[i]), int(df["item_id"].iat[i])
            first = int(lines[np.flatnonzero((df["user_id"].to_numpy() == u) & (df["item_id"].to_numpy() == it))[0]])
            msg = (f"duplicate rating of item {it} by user {u} (first at {row_word} {first}); "
                   "use --duplicates keep-last to keep the latest one")
            if row_word == "line":
                raise DataError(msg, path, int(lines[i]))
            raise DataError(f"row {int(lines[i])}: {msg}", path)
        order = np.lexsort((lines, df["timestamp"].to_numpy(), df["item_id"].to_numpy(), df["user_id"].to_numpy()))
        df = df.iloc[order]
        kept = ~df.duplicated(["user_id", "item_id"], keep="last").to_numpy()
        log.warning("%s: %d duplicate (user, item) ratings dropped (kept the latest)", path, int((~kept).sum()))
        df = df[kept]
        lines = np.asarray(lines)[order][kept]
        restore = np.argsort(lines, kind="stable")
        df, lines = df.iloc[restore], lines[restore]
    return df.reset_index(drop=True), np.asarray(lines)


def check_known_items(ratings: pd.DataFrame, lines: np.ndarray, items: pd.DataFrame, path: Path, items_path: Path,
                      row_word: str = "line") -> None:
    unknown = ~ratings["item_id"].isin(items["item_id"]).to_numpy()
    if unknown.any():
        i = _first(unknown)
        msg = (f"rating for item {int(ratings['item_id'].iat[i])}, which is not in the item table {items_path} "
               f"({int(unknown.sum())} such ratings)")
        if row_word == "line":
            raise DataError(msg, path, int(lines[i]))
        raise DataError(f"row {int(lines[i])}: {msg}", path)


def split_title_year(title: str, path: Path | None = None, line: int | None = None) -> tuple[str, int | None]:
    """'Matrix, The (1999)' -> ('Matrix, The', 1999); a title without a year keeps year None."""
    title = title.strip()
    m = _TITLE_YEAR.match(title)
    if m:
        year = int(m.group(2))
        if not MIN_YEAR <= year <= MAX_YEAR:
            raise DataError(f"bad year {year} in title {title!r} (expected {MIN_YEAR}-{MAX_YEAR})", path, line)
        return m.group(1), year
    m = _TRAILING_PAREN.search(title)
    if m and re.fullmatch(r"[\d?xX-]{3,6}", m.group(1).strip()) and any(c.isdigit() for c in m.group(1)):
        raise DataError(f"bad year ({m.group(1)}) in title {title!r}", path, line)
    return title, None


def _items_frame(records: list[dict], path: Path, lines: list[int]) -> pd.DataFrame:
    items = pd.DataFrame.from_records(records, columns=ITEM_COLUMNS)
    dup = items["item_id"].duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise DataError(f"item id {int(items['item_id'].iat[i])} appears twice", path, lines[i])
    items["item_id"] = items["item_id"].astype("int64")
    items["year"] = items["year"].astype("Int64")
    for col in ("title", "genres", "summary", "cast"):
        items[col] = items[col].astype(str)
    return items


# ---------------------------------------------------------------------------------------------
# MovieLens-1M
# ---------------------------------------------------------------------------------------------


def _resolve(data_dir: Path, name: str | Path) -> Path:
    p = Path(name)
    return p if p.is_absolute() else Path(data_dir) / p


def read_ml1m_movies(path: Path) -> pd.DataFrame:
    text = read_text(path)
    records, lines = [], []
    for lineno, parts in _split_lines(path, text, "::", 3, "MovieID::Title::Genres"):
        item_id = _check_int_field(parts[0], "MovieID", path, lineno)
        if item_id < 0:
            raise DataError(f"negative MovieID {item_id}", path, lineno)
        title, year = split_title_year(parts[1], path, lineno)
        genres = "" if parts[2].strip() in ("", "(no genres listed)") else parts[2].strip()
        records.append({"item_id": item_id, "title": title, "year": year, "genres": genres, "summary": "", "cast": ""})
        lines.append(lineno)
    if not records:
        raise DataError("file has no data rows", path)
    return _items_frame(records, path, lines)


def read_ml1m_users(path: Path) -> pd.DataFrame:
    text = read_text(path)
    rows = []
    for lineno, parts in _split_lines(path, text, "::", 5, "UserID::Gender::Age::Occupation::Zip-code"):
        rows.append({
            "user_id": _check_int_field(parts[0], "UserID", path, lineno),
            "gender": parts[1].strip(),
            "age": _check_int_field(parts[2], "Age", path, lineno),
            "occupation": _check_int_field(parts[3], "Occupation", path, lineno),
            "zip": parts[4].strip(),
        })
    return pd.DataFrame(rows).astype({"user_id": "int64", "age": "int64", "occupation": "int64"})


def load_ml1m(data_dir: str | Path, ratings_file: str | Path = "ratings.dat", *, duplicates: str = "error") -> RatingLog:
    """MovieLens-1M: ``ratings.dat``, ``movies.dat`` (and ``users.dat`` when present), ``::``-separated.

    ``ratings_file`` may name another ratings file in ``data_dir`` (or an absolute path), such as
    ``ratings.partial-users0001-2999.dat``.
    """
    data_dir = Path(data_dir)
    ratings_path = _resolve(data_dir, ratings_file)
    movies_path = data_dir / "movies.dat"
    users_path = data_dir / "users.dat"
    items = read_ml1m_movies(movies_path)
    ratings, lines = _parse_int_table(ratings_path, read_text(ratings_path), "::", RATING_COLUMNS)
    ratings, lines = validate_ratings(ratings, lines, ratings_path, duplicates=duplicates)
    check_known_items(ratings, lines, items, ratings_path, movies_path)
    users = read_ml1m_users(users_path) if users_path.exists() else None
    inputs = {str(p.resolve()): file_sha256(p) for p in (ratings_path, movies_path, users_path) if p.exists()}
    return RatingLog("ml-1m", ratings, items, users, inputs)


# ---------------------------------------------------------------------------------------------
# MovieLens-100K
# ---------------------------------------------------------------------------------------------


def read_ml100k_genres(path: Path) -> list[str]:
    text = read_text(path)
    names: dict[int, str] = {}
    for lineno, parts in _split_lines(path, text, "|", 2, "genre|index"):
        names[_check_int_field(parts[1], "genre index", path, lineno)] = parts[0].strip()
    if sorted(names) != list(range(len(names))):
        raise DataError(f"genre indices must be 0..{len(names) - 1}, found {sorted(names)}", path)
    return [names[i] for i in range(len(names))]


def read_ml100k_items(path: Path, genre_names: list[str]) -> pd.DataFrame:
    text = read_text(path)
    n_fields = 5 + len(genre_names)
    records, lines = [], []
    for lineno, parts in _split_lines(path, text, "|", n_fields, f"id|title|release date|video date|url|{len(genre_names)} genre flags"):
        item_id = _check_int_field(parts[0], "movie id", path, lineno)
        title, year = split_title_year(parts[1], path, lineno)
        if year is None and parts[2].strip():
            m = re.search(r"(\d{4})$", parts[2].strip())
            if not m:
                raise DataError(f"bad release date {parts[2]!r}", path, lineno)
            year = int(m.group(1))
            if not MIN_YEAR <= year <= MAX_YEAR:
                raise DataError(f"bad year {year} in release date {parts[2]!r}", path, lineno)
        flags = parts[5:]
        if any(f.strip() not in ("0", "1") for f in flags):
            raise DataError("genre flags must be 0 or 1", path, lineno)
        genres = "|".join(g for g, f in zip(genre_names, flags) if f.strip() == "1" and g != "unknown")
        records.append({"item_id": item_id, "title": title, "year": year, "genres": genres, "summary": "", "cast": ""})
        lines.append(lineno)
    if not records:
        raise DataError("file has no data rows", path)
    return _items_frame(records, path, lines)


def read_ml100k_users(path: Path) -> pd.DataFrame:
    text = read_text(path)
    rows = []
    for lineno, parts in _split_lines(path, text, "|", 5, "user id|age|gender|occupation|zip code"):
        rows.append({
            "user_id": _check_int_field(parts[0], "user id", path, lineno),
            "age": _check_int_field(parts[1], "age", path, lineno),
            "gender": parts[2].strip(),
            "occupation": parts[3].strip(),
            "zip": parts[4].strip(),
        })
    return pd.DataFrame(rows).astype({"user_id": "int64", "age": "int64"})


def load_ml100k(data_dir: str | Path, ratings_file: str | Path = "u.data", *, duplicates: str = "error") -> RatingLog:
    """MovieLens-100K: ``u.data`` (tab-separated), ``u.item`` (``|``, 19 genre flags), ``u.genre``, ``u.user``."""
    data_dir = Path(data_dir)
    ratings_path = _resolve(data_dir, ratings_file)
    items_path, genre_path, users_path = data_dir / "u.item", data_dir / "u.genre", data_dir / "u.user"
    genre_names = read_ml100k_genres(genre_path) if genre_path.exists() else ["unknown", *ML_GENRES]
    items = read_ml100k_items(items_path, genre_names)
    ratings, lines = _parse_int_table(ratings_path, read_text(ratings_path), "\t", RATING_COLUMNS)
    ratings, lines = validate_ratings(ratings, lines, ratings_path, duplicates=duplicates)
    check_known_items(ratings, lines, items, ratings_path, items_path)
    users = read_ml100k_users(users_path) if users_path.exists() else None
    inputs = {str(p.resolve()): file_sha256(p) for p in (ratings_path, items_path, genre_path, users_path) if p.exists()}
    return RatingLog("ml-100k", ratings, items, users, inputs)


# ---------------------------------------------------------------------------------------------
# Generic CSV / Parquet
# ---------------------------------------------------------------------------------------------

RATING_KEYS = ("user", "item", "rating", "timestamp")
ITEM_KEYS = ("title", "year", "genres", "summary", "cast")


def parse_columns(spec: str | None) -> dict[str, str]:
    """'user=uid,item=iid,rating=stars,timestamp=ts' -> {'user': 'uid', ...}.

    Unmapped keys default to the normalised names: user_id, item_id, rating, timestamp, title, year,
    genres, summary, cast.
    """
    mapping = {"user": "user_id", "item": "item_id", **{k: k for k in ("rating", "timestamp", *ITEM_KEYS)}}
    if not spec:
        return mapping
    for part in spec.split(","):
        if "=" not in part:
            raise ConfigError(f"--columns entry {part!r} is not KEY=COLUMN (keys: {', '.join(mapping)})")
        key, col = (s.strip() for s in part.split("=", 1))
        if key not in mapping:
            raise ConfigError(f"--columns key {key!r} unknown; keys are {', '.join(mapping)}")
        mapping[key] = col
    used: dict[str, str] = {}
    for key in ("user", "item", "rating", "timestamp"):  # the ratings file's columns: one per key
        if mapping[key] in used:
            raise ConfigError(f"--columns maps {used[mapping[key]]} and {key} to the same column "
                              f"{mapping[key]!r}; each needs a column of its own (e.g. --columns "
                              f"user=COL,item=COL)")
        used[mapping[key]] = key
    return mapping


def _read_table(path: Path, sep: str | None) -> tuple[pd.DataFrame, int, str]:
    """Read a CSV/TSV/Parquet table as strings; return it, the line of its first row and the row word."""
    if not path.exists():
        raise DataError("file not found", path)
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a non-Parquet file
            raise DataError(f"not a readable Parquet file ({type(e).__name__}: {e})", path) from None
        if len(df) == 0:
            raise DataError("file has no rows", path)
        return df, 1, "row"
    text = read_text(path)
    if sep is None:
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=True)
    except pd.errors.ParserError as e:
        m = re.search(r"line (\d+)", str(e))
        raise DataError(f"malformed CSV: {e}", path, int(m.group(1)) if m else None) from None
    except pd.errors.EmptyDataError:
        raise DataError("file is empty", path) from None
    if len(df) == 0:
        raise DataError("file has a header but no rows", path)
    return df, 2, "line"


def _lines_of(df: pd.DataFrame, first: int) -> np.ndarray:
    return np.arange(first, first + len(df))


def _int_column(df: pd.DataFrame, col: str, name: str, path: Path, lines: np.ndarray, row_word: str) -> pd.Series:
    """An integral column (``4`` and ``4.0`` both read as 4); the first other value is an error."""
    raw = df[col]
    if pd.api.types.is_integer_dtype(raw):
        return raw.astype("int64")
    values = pd.to_numeric(raw, errors="coerce")
    not_int = (values.isna() | (values % 1 != 0)).to_numpy()
    too_large = np.zeros(len(values), dtype=bool)
    exact = {}  # beyond 2**53 a float is not exact: read those from the text (int64 would wrap past 2**63)
    for i in np.flatnonzero(~not_int & (values.abs() >= 2.0**53).to_numpy()):
        try:
            exact[i] = int(str(raw.iat[i]).strip())
        except ValueError:
            exact[i] = INT64_MAX + 1
        too_large[i] = abs(exact[i]) > INT64_MAX
    bad = not_int | too_large
    if bad.any():
        i = _first(bad)
        what = "is too large (more than 64 bits)" if too_large[i] and not not_int[i] else "is not an integer"
        msg = f"{name} {raw.iat[i]!r} (column {col!r}) {what}"
        if row_word == "line":
            raise DataError(msg, path, int(lines[i]))
        raise DataError(f"row {int(lines[i])}: {msg}", path)
    result = values.where(~values.index.isin(values.index[list(exact)]), 0).astype("int64")
    for i, number in exact.items():
        result.iat[i] = number
    return result


def _timestamp_column(df: pd.DataFrame, col: str, path: Path, lines: np.ndarray, row_word: str) -> pd.Series:
    numeric = pd.to_numeric(df[col], errors="coerce")
    if numeric.notna().any():  # unix seconds (the first non-number is the error)
        return _int_column(df, col, "timestamp", path, lines, row_word)
    if pd.api.types.is_datetime64_any_dtype(df[col]):
        parsed = df[col]
    else:
        parsed = pd.to_datetime(df[col], errors="coerce", utc=True, format="ISO8601")
    bad = parsed.isna().to_numpy()
    if bad.any():
        i = _first(bad)
        msg = f"timestamp {df[col].iat[i]!r} (column {col!r}) is neither unix seconds nor an ISO-8601 date"
        if row_word == "line":
            raise DataError(msg, path, int(lines[i]))
        raise DataError(f"row {int(lines[i])}: {msg}", path)
    if parsed.dt.tz is None:
        parsed = parsed.dt.tz_localize("UTC")
    return ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).astype("int64")


def _require_columns(df: pd.DataFrame, wanted: dict[str, str], path: Path) -> None:
    missing = [f"{col!r} (for {key})" for key, col in wanted.items() if col not in df.columns]
    if missing:
        raise DataError(
            f"missing column(s) {', '.join(missing)}; the file has {list(map(str, df.columns))}. "
            "Map them with --columns user=COL,item=COL,rating=COL,timestamp=COL",
            path,
        )


def load_generic(
    ratings_path: str | Path,
    columns: dict[str, str] | str | None = None,
    items_path: str | Path | None = None,
    *,
    sep: str | None = None,
    duplicates: str = "error",
) -> RatingLog:
    """A ratings CSV/TSV/Parquet with a column mapping, and an optional item table.

    Ratings need user, item, rating (integral 1..5) and timestamp (unix seconds or ISO-8601).
    The item table needs the item column and may have title, year, genres ("|"-separated),
    summary and cast; without one, each item is titled "item <id>".
    """
    mapping = columns if isinstance(columns, dict) else parse_columns(columns)
    ratings_path = Path(ratings_path)
    df, first, row_word = _read_table(ratings_path, sep)
    _require_columns(df, {k: mapping[k] for k in RATING_KEYS}, ratings_path)
    lines = _lines_of(df, first)
    ratings = pd.DataFrame({
        "user_id": _int_column(df, mapping["user"], "user id", ratings_path, lines, row_word),
        "item_id": _int_column(df, mapping["item"], "item id", ratings_path, lines, row_word),
        "rating": _int_column(df, mapping["rating"], "rating", ratings_path, lines, row_word),
        "timestamp": _timestamp_column(df, mapping["timestamp"], ratings_path, lines, row_word),
    }).reset_index(drop=True)
    ratings, lines = validate_ratings(ratings, lines, ratings_path, duplicates=duplicates, row_word=row_word)
    inputs = {str(ratings_path.resolve()): file_sha256(ratings_path)}

    if items_path is None:
        ids = np.sort(ratings["item_id"].unique())
        items = pd.DataFrame({
            "item_id": ids.astype("int64"), "title": [f"item {i}" for i in ids],
            "year": pd.array([pd.NA] * len(ids), dtype="Int64"), "genres": "", "summary": "", "cast": "",
        })
        return RatingLog("generic", ratings, items, None, inputs)

    items_path = Path(items_path)
    idf, ifirst, irow_word = _read_table(items_path, sep)
    _require_columns(idf, {"item": mapping["item"]}, items_path)
    ilines = _lines_of(idf, ifirst)
    records = []
    item_ids = _int_column(idf, mapping["item"], "item id", items_path, ilines, irow_word)
    for i, item_id in enumerate(item_ids):
        row = idf.iloc[i]
        line = int(ilines[i]) if irow_word == "line" else None

        def get(key: str) -> str:
            col = mapping[key]
            return "" if col not in idf.columns or pd.isna(row[col]) else str(row[col]).strip()

        title, year = split_title_year(get("title") or f"item {item_id}", items_path, line)
        if get("year"):
            try:
                year = int(float(get("year")))
            except ValueError:
                raise DataError(f"bad year {get('year')!r}", items_path, line) from None
            if not MIN_YEAR <= year <= MAX_YEAR:
                raise DataError(f"bad year {year} (expected {MIN_YEAR}-{MAX_YEAR})", items_path, line)
        records.append({"item_id": int(item_id), "title": title, "year": year, "genres": get("genres"),
                        "summary": get("summary"), "cast": get("cast")})
    items = _items_frame(records, items_path, [int(x) for x in ilines])
    check_known_items(ratings, lines, items, ratings_path, items_path, row_word)
    inputs[str(items_path.resolve())] = file_sha256(items_path)
    return RatingLog("generic", ratings, items, None, inputs)


def load_ratings(
    dataset: str,
    data_dir: str | Path | None = None,
    *,
    ratings_file: str | Path | None = None,
    items_file: str | Path | None = None,
    columns: dict[str, str] | str | None = None,
    duplicates: str = "error",
) -> RatingLog:
    """Dispatch on ``dataset`` ("ml-1m", "ml-100k", "synthetic" (ML-1M format) or "generic")."""
    if dataset in ("ml-1m", "synthetic"):
        if data_dir is None:
            raise ConfigError(f"--data-dir is required for --dataset {dataset}")
        out = load_ml1m(data_dir, ratings_file or "ratings.dat", duplicates=duplicates)
        out.dataset = dataset
        return out
    if dataset == "ml-100k":
        if data_dir is None:
            raise ConfigError("--data-dir is required for --dataset ml-100k")
        return load_ml100k(data_dir, ratings_file or "u.data", duplicates=duplicates)
    if dataset == "generic":
        if ratings_file is None:
            raise ConfigError("--dataset generic needs --ratings-file (CSV, TSV or Parquet)")
        path = _resolve(Path(data_dir), ratings_file) if data_dir is not None else Path(ratings_file)
        ipath = None
        if items_file is not None:
            ipath = _resolve(Path(data_dir), items_file) if data_dir is not None else Path(items_file)
        return load_generic(path, columns, ipath, duplicates=duplicates)
    raise ConfigError(f"unknown dataset {dataset!r}; choose ml-1m, ml-100k, synthetic or generic")
