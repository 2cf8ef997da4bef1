"""Loaders: each format parses into the normalised form; every malformed input names file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from persona_tune.data.loaders import (
    load_generic, load_ml100k, load_ml1m, load_ratings, parse_columns, split_title_year,
)
from persona_tune.data.metadata import load_metadata
from persona_tune.errors import ConfigError, DataError

MOVIES = "1::Matrix, The (1999)::Action|Sci-Fi|Thriller\n2::Misérables, Les (1995)::Drama|Musical\n3::Untitled::Drama\n"
RATINGS = "1::1::5::978300760\n1::2::3::978300761\n2::1::4::978300762\n2::3::1::978300763\n"


def ml1m(tmp_path: Path, ratings: str | bytes = RATINGS, movies: str | bytes = MOVIES) -> Path:
    d = tmp_path / "ml1m"
    d.mkdir(exist_ok=True)
    for name, content in (("ratings.dat", ratings), ("movies.dat", movies)):
        data = content if isinstance(content, bytes) else content.encode("latin-1")
        (d / name).write_bytes(data)
    return d


def ml100k(tmp_path: Path, data: str = "1\t1\t5\t881250949\n1\t2\t3\t881250950\n2\t1\t2\t881250951\n",
           item_flags: str = "0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0") -> Path:
    d = tmp_path / "ml100k"
    d.mkdir(exist_ok=True)
    (d / "u.data").write_text(data)
    (d / "u.item").write_bytes(
        (f"1|Toy Story (1995)|01-Jan-1995||http://x|{item_flags}\n"
         "2|unknown|||http://y|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
         "3|Café Society|01-Jan-1997||http://z|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0\n").encode("latin-1"))
    (d / "u.genre").write_text("\n".join(f"{g}|{i}" for i, g in enumerate(
        ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
         "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"])) + "\n\n")
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    return d


def expect(exc_info, path: Path, line: int | None, *fragments: str) -> None:
    err = exc_info.value
    assert err.path == str(path), str(err)
    assert err.line == line, str(err)
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(err).startswith(where), str(err)
    for fragment in fragments:
        assert fragment in str(err), str(err)


# ----------------------------------------------------------------------------- well-formed input


def test_ml1m_parses_titles_years_and_latin1(tmp_path):
    log = load_ml1m(ml1m(tmp_path))
    assert list(log.ratings.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert all(str(t) == "int64" for t in log.ratings.dtypes)
    items = log.items.set_index("item_id")
    assert items.loc[1, "title"] == "Matrix, The" and items.loc[1, "year"] == 1999
    assert items.loc[2, "title"] == "Misérables, Les"
    assert pd.isna(items.loc[3, "year"]) and items.loc[1, "genres"] == "Action|Sci-Fi|Thriller"
    assert len(log.inputs) == 2 and log.users is None


def test_ml1m_other_ratings_file_crlf_and_blank_lines(tmp_path):
    d = ml1m(tmp_path)
    (d / "ratings.partial.dat").write_bytes(b"1::1::5::10\r\n\r\n2::3::2::11\r\n")
    log = load_ml1m(d, "ratings.partial.dat")
    assert log.ratings.values.tolist() == [[1, 1, 5, 10], [2, 3, 2, 11]]
    (d / "ratings.partial.dat").write_bytes(b"1::1::5::10\n\n2::3::9::11\n")
    with pytest.raises(DataError) as e:
        load_ml1m(d, "ratings.partial.dat")
    expect(e, d / "ratings.partial.dat", 3, "rating 9 out of range 1-5")


def test_ml100k_genre_flags_years_and_users(tmp_path):
    log = load_ml100k(ml100k(tmp_path))
    items = log.items.set_index("item_id")
    assert items.loc[1, "genres"] == "Animation|Children's|Comedy" and items.loc[1, "year"] == 1995
    assert items.loc[2, "genres"] == "" and pd.isna(items.loc[2, "year"])  # the "unknown" genre is dropped
    assert items.loc[3, "title"] == "Café Society" and items.loc[3, "year"] == 1997  # year from the release date
    assert log.users["occupation"].tolist() == ["technician", "other"]
    assert len(log.ratings) == 3


def test_generic_csv_with_mapping_iso_dates_and_item_table(tmp_path):
    ratings = tmp_path / "r.csv"
    ratings.write_text("uid,iid,stars,ts\n7,100,4.0,2001-01-01T00:00:00Z\n7,200,2,2001-01-02\n8,100,5,2001-01-03\n")
    items = tmp_path / "i.csv"
    items.write_text('iid,name,year,genres\n100,"Heat (1995)",,Action|Crime\n200,Clue,1985,Comedy\n')
    log = load_generic(ratings, "user=uid,item=iid,rating=stars,timestamp=ts,title=name", items)
    assert log.ratings.values.tolist() == [[7, 100, 4, 978307200], [7, 200, 2, 978393600], [8, 100, 5, 978480000]]
    it = log.items.set_index("item_id")
    assert it.loc[100, "title"] == "Heat" and it.loc[100, "year"] == 1995 and it.loc[200, "year"] == 1985
    assert it.loc[100, "genres"] == "Action|Crime"


def test_generic_parquet_without_item_table(tmp_path):
    path = tmp_path / "r.parquet"
    pd.DataFrame({"user_id": [1, 1], "item_id": [5, 6], "rating": [3, 4], "timestamp": [1, 2]}).to_parquet(path)
    log = load_ratings("generic", ratings_file=path)
    assert log.items["title"].tolist() == ["item 5", "item 6"] and log.items["year"].isna().all()


def test_duplicates_keep_last_keeps_the_latest_timestamp(tmp_path):
    d = ml1m(tmp_path, "1::1::5::100\n1::2::3::101\n1::1::2::300\n1::1::4::200\n")
    log = load_ml1m(d, duplicates="keep-last")
    assert sorted(log.ratings.values.tolist()) == [[1, 1, 2, 300], [1, 2, 3, 101]]


def test_split_title_year():
    assert split_title_year("City of Lost Children, The (Cité des enfants perdus, La) (1995)") == (
        "City of Lost Children, The (Cité des enfants perdus, La)", 1995)
    assert split_title_year("Untitled") == ("Untitled", None)


# ----------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize("ratings,line,fragments", [
    ("1::1::5::1\n1::2::3\n", 2, ("expected 4 fields", "found 3")),                # 1 missing field
    ("1::1::5::1\n1::2::3::4::5\n", 2, ("expected 4 fields", "found 5")),          # 2 extra field
    ("1::1::5::1\nabc::2::3::4\n", 2, ("user_id 'abc' is not an integer",)),        # 3 non-integer id
    ("1::1::5::1\n1::x2::3::4\n", 2, ("item_id 'x2' is not an integer",)),          # 4 non-integer item id
    ("1::1::5::1\n1::2::6::4\n", 2, ("rating 6 out of range 1-5",)),                # 5 rating too high
    ("1::1::0::1\n", 1, ("rating 0 out of range 1-5",)),                            # 6 rating too low
    ("1::1::5::1\n1::2::3.5::4\n", 2, ("rating '3.5' is not an integer",)),         # 7 non-integer rating
    ("1::1::5::1\n1::2::3::-4\n", 2, ("negative timestamp -4",)),                   # 8 negative timestamp
    ("1::1::5::1\n1::2::3::2\n1::1::4::3\n", 3, ("duplicate rating of item 1 by user 1", "first at line 1",
                                                  "--duplicates keep-last")),    # 9 duplicate pair
    ("1::1::5::1\n1::99::3::2\n", 2, ("rating for item 99", "movies.dat")),        # 10 unknown item
    ("1::1::5::1\n1::2::3::2.5\n", 2, ("timestamp '2.5' is not an integer",)),      # 11 fractional timestamp
])
def test_malformed_ml1m_ratings(tmp_path, ratings, line, fragments):
    d = ml1m(tmp_path, ratings)
    with pytest.raises(DataError) as e:
        load_ml1m(d)
    expect(e, d / "ratings.dat", line, *fragments)


@pytest.mark.parametrize("content,line,fragment", [
    ("1::1::5::1\n".encode("utf-16"), None, "UTF-16"),                              # 12 UTF-16 (BOM)
    ("1::1::5::1\n".encode("utf-16-le"), 1, "NUL bytes"),                           # 13 UTF-16 without BOM
    (b"1::1::5::1\n\x89PNG\x00\x01\x02", 2, "NUL bytes"),                           # 14 binary
    (b"", None, "file is empty"),                                                   # 15 empty
    (b"\n \n", None, "file is empty"),                                              # 16 only blank lines
])
def test_wrong_encoding_and_empty_files(tmp_path, content, line, fragment):
    d = ml1m(tmp_path, content)
    with pytest.raises(DataError) as e:
        load_ml1m(d)
    expect(e, d / "ratings.dat", line, fragment)


def test_missing_files(tmp_path):                                                     # 17 missing files
    d = ml1m(tmp_path)
    with pytest.raises(DataError) as e:
        load_ml1m(d, "ratings.partial-users0001-2999.dat")
    expect(e, d / "ratings.partial-users0001-2999.dat", None, "file not found")
    (d / "movies.dat").unlink()
    with pytest.raises(DataError) as e:
        load_ml1m(d)
    expect(e, d / "movies.dat", None, "file not found")


@pytest.mark.parametrize("movies,line,fragment", [
    ("1::Matrix, The (1999)::Action\n2::Old (0999)::Drama\n", 2, "bad year 999"),   # 18 year out of range
    ("1::Matrix, The (1999)::Action\n2::Odd (19x5)::Drama\n", 2, "bad year (19x5)"),  # 19 garbled year
    ("1::Matrix, The (1999)::Action\n2::No genres\n", 2, "expected 3 fields"),        # 20 movies field count
    ("1::Matrix, The (1999)::Action\n1::Again (1999)::Drama\n", 2, "item id 1 appears twice"),  # 21 dup item
    ("1::Matrix, The (1999)::Action\nB::Heat (1995)::Drama\n", 2, "MovieID 'B' is not an integer"),  # 22
])
def test_malformed_movies(tmp_path, movies, line, fragment):
    d = ml1m(tmp_path, "1::1::5::1\n", movies)
    with pytest.raises(DataError) as e:
        load_ml1m(d)
    expect(e, d / "movies.dat", line, fragment)


def test_malformed_ml100k(tmp_path):
    d = ml100k(tmp_path, item_flags="0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|2")   # 23 genre flag not 0/1
    with pytest.raises(DataError) as e:
        load_ml100k(d)
    expect(e, d / "u.item", 1, "genre flags must be 0 or 1")
    d = ml100k(tmp_path, data="1\t1\t5\t881250949\n1\t2\t3\n")                     # 24 u.data field count
    with pytest.raises(DataError) as e:
        load_ml100k(d)
    expect(e, d / "u.data", 2, "expected 4 fields", "'\\t'")


def test_generic_missing_column(tmp_path):                                            # 25 mapping misses
    path = tmp_path / "r.csv"
    path.write_text("uid,iid,stars\n1,2,3\n")
    with pytest.raises(DataError) as e:
        load_generic(path, "user=uid,item=iid,rating=stars,timestamp=ts")
    expect(e, path, None, "missing column(s) 'ts' (for timestamp)", "--columns")


@pytest.mark.parametrize("body,line,fragment", [
    ("u,i,r,t\n1,2,3,4\n1,3,4.5,5\n", 3, "rating '4.5' (column 'r') is not an integer"),   # 26
    ("u,i,r,t\n1,2,3,4\n1,3,4,5,6\n", 3, "malformed CSV"),                                 # 27
    ("u,i,r,t\n1,2,3,2001-01-01\n1,3,4,yesterday\n", 3, "neither unix seconds nor an ISO-8601 date"),  # 28
    ("u,i,r,t\n1,2,3,4\n,3,4,5\n", 3, "user id '' (column 'u') is not an integer"),       # 29 empty id
    ("u,i,r,t\n", None, "header but no rows"),                                              # 30
])
def test_generic_csv_malformed(tmp_path, body, line, fragment):
    path = tmp_path / "r.csv"
    path.write_text(body)
    with pytest.raises(DataError) as e:
        load_generic(path, "user=u,item=i,rating=r,timestamp=t")
    expect(e, path, line, fragment)


def test_generic_parquet_rows_and_bad_parquet(tmp_path):
    path = tmp_path / "r.parquet"
    pd.DataFrame({"user_id": [1, 1], "item_id": [5, 6], "rating": [3, 7], "timestamp": [1, 2]}).to_parquet(path)
    with pytest.raises(DataError) as e:                                                     # 31 row numbers
        load_generic(path)
    expect(e, path, None, "row 2: rating 7 out of range 1-5")
    fake = tmp_path / "fake.parquet"
    fake.write_text("user_id,item_id\n")
    with pytest.raises(DataError) as e:                                                     # 32 not Parquet
        load_generic(fake)
    expect(e, fake, None, "not a readable Parquet file")


def test_generic_item_table_errors(tmp_path):
    ratings = tmp_path / "r.csv"
    ratings.write_text("user_id,item_id,rating,timestamp\n1,10,4,1\n1,11,4,2\n")
    items = tmp_path / "i.csv"
    items.write_text("item_id,title,year\n10,A,1990\n11,B,twenty\n")
    with pytest.raises(DataError) as e:                                                     # 33 bad year column
        load_generic(ratings, None, items)
    expect(e, items, 3, "bad year 'twenty'")
    items.write_text("item_id,title\n10,A\n")
    with pytest.raises(DataError) as e:                                                     # 34 unknown item
        load_generic(ratings, None, items)
    expect(e, ratings, 3, "rating for item 11", str(items))


def test_bad_options_and_metadata(tmp_path):
    with pytest.raises(ConfigError, match="not KEY=COLUMN"):                               # 35
        parse_columns("user")
    with pytest.raises(ConfigError, match="unknown"):
        parse_columns("usr=a")
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_ratings("netflix", tmp_path)
    meta = tmp_path / "meta.json"
    meta.write_text('{\n  "1": "A film.",\n  "2": oops\n}\n')
    with pytest.raises(DataError) as e:                                                     # 36 invalid JSON
        load_metadata(meta)
    expect(e, meta, 3, "invalid JSON")
    meta.write_text(json.dumps({"x": "A film."}))
    with pytest.raises(DataError) as e:                                                     # 37 bad key
        load_metadata(meta)
    expect(e, meta, None, "key 'x' is not an integer item id")
