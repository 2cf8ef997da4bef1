"""Download MovieLens-1M or MovieLens-100K from GroupLens into a cache folder, with checksums.

The zip is checked against the MD5 that GroupLens publishes beside it (ml-1m.zip.md5), and each
extracted data file against a known SHA-256 (ratings.dat of ML-1M, whose SHA-256 is not on
record, against its git blob id). Nothing is used unless every check passes. Offline, it fails at
once and says how to point `persona-tune prepare --data-dir` at files obtained some other way.
MovieLens may not be redistributed: the files stay in your cache, never in a repository.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from persona_tune.errors import PersonaTuneError
from persona_tune.net import Deadline, redact
from persona_tune.runfolder import atomic_path, atomic_write_bytes, file_sha256
from persona_tune.stage import ranged

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("~/.cache/persona-tune")


class DownloadError(PersonaTuneError):
    """A download failed, or what came back does not match the known checksums."""


@dataclass(frozen=True)
class Source:
    url: str
    folder: str  # the folder inside the zip, and under the cache dir
    zip_md5: str | None  # GroupLens' published checksum of the zip
    sha256: dict[str, str] = field(default_factory=dict)  # file in folder -> SHA-256
    git_blob: dict[str, str] = field(default_factory=dict)  # file in folder -> git blob id (SHA-1)
    prepare_hint: str = ""


# Checksums: zip MD5s as published by GroupLens (ml-1m.zip.md5, ml-100k.zip.md5); file SHA-256s and
# the ratings.dat blob id as recorded in ../shared/data/*/SOURCE.txt (each corroborated across repos).
SOURCES = {
    "ml-1m": Source(
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        folder="ml-1m",
        zip_md5="c4d9eecfca2ab87c1945afe126590906",
        sha256={
            "movies.dat": "0140fc2356357c1a851d0f52e893a1e4d3696df632c4141cea8d5bc3d621f0b9",
            "users.dat": "1dc3a95300cb19f7c10e027daf29b8cdf1d908dab65b5edfb45950aa389a10a3",
        },
        git_blob={"ratings.dat": "77a7c4b150f588c23bb9e1f068aa996c0b413695"},
        prepare_hint="persona-tune prepare --dataset ml-1m --data-dir {dir} --out RUN",
    ),
    "ml-100k": Source(
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        folder="ml-100k",
        zip_md5="0e33842e24a9c977be4e0107933c0723",
        sha256={
            "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
            "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
            "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
            "u.genre": "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb",
        },
        prepare_hint="persona-tune prepare --dataset ml-100k --data-dir {dir} --out RUN",
    ),
}


def git_blob_id(path: Path) -> str:
    """`git hash-object` of a file: SHA-1 of "blob <size>\\0" + content."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def verify_files(folder: Path, source: Source) -> None:
    """Raise DownloadError unless every file with a known checksum is present and matches."""
    for name, expected in source.sha256.items():
        path = folder / name
        if not path.is_file():
            raise DownloadError(f"{path} is missing from the download")
        got = file_sha256(path)
        if got != expected:
            raise DownloadError(f"sha256 mismatch for {path}: expected {expected}, got {got}")
    for name, expected in source.git_blob.items():
        path = folder / name
        if not path.is_file():
            raise DownloadError(f"{path} is missing from the download")
        got = git_blob_id(path)
        if got != expected:
            raise DownloadError(f"git blob id mismatch for {path}: expected {expected}, got {got}")


def _fetch(url: str, dest: Path, timeout: float, offline_hint: str, deadline: float = 1800.0) -> None:
    """``url`` into ``dest``: ``timeout`` seconds without a byte at most, ``deadline`` seconds in all."""
    total_time = Deadline(deadline, f"download of {url}")
    try:
        with urllib.request.urlopen(url, timeout=min(timeout, total_time.remaining())) as resp, \
                atomic_path(dest) as tmp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while block := resp.read1(1 << 16):  # read1: one read, so a trickle still meets the deadline
                    f.write(block)
                    bar.update(len(block))
                    total_time.remaining()
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"cannot download {redact(url)} ({redact(str(reason))}). If this machine is offline, fetch the zip elsewhere, "
            f"unzip it and run `{offline_hint}`"
        ) from None


def download(dataset: str, cache_dir: str | Path = DEFAULT_CACHE, *, url: str | None = None,
             source: Source | None = None, timeout: float = 30.0, deadline: float = 1800.0) -> Path:
    """Download and verify ``dataset`` into ``cache_dir/<folder>``; return that folder.

    A folder already there whose files pass the checks is used as is. ``url`` overrides the
    download address (a mirror); ``source`` replaces the whole entry (checksums included).
    """
    if source is None:
        if dataset not in SOURCES:
            raise DownloadError(f"unknown dataset {dataset!r}; choose one of {', '.join(SOURCES)}")
        source = SOURCES[dataset]
    url = url or source.url
    cache_dir = Path(cache_dir).expanduser()
    folder = cache_dir / source.folder
    hint = source.prepare_hint.format(dir="DIR")
    if folder.is_dir():
        try:
            verify_files(folder, source)
            log.info("%s already downloaded and verified", folder)
            return folder
        except DownloadError as e:
            log.warning("%s; downloading again", e)

    zip_path = cache_dir / f"{source.folder}.zip"
    _fetch(url, zip_path, timeout, hint, deadline)
    if source.zip_md5 is not None:
        got = hashlib.md5(zip_path.read_bytes()).hexdigest()
        if got != source.zip_md5:
            zip_path.unlink()
            raise DownloadError(f"md5 mismatch for {zip_path} from {url}: expected {source.zip_md5}, got {got}")
    staging = cache_dir / f".{source.folder}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            prefix = source.folder + "/"
            for member in zf.infolist():
                name = member.filename
                if member.is_dir() or not name.startswith(prefix) or ".." in Path(name).parts:
                    continue
                atomic_write_bytes(staging / name[len(prefix):], zf.read(member))
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{zip_path} from {url} is not a valid zip: {e}") from None
    try:
        verify_files(staging, source)
    except DownloadError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    log.info("%s: sha256 %s", zip_path, file_sha256(zip_path))
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=sorted(SOURCES), help="which MovieLens release")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the zip and its files go")
    parser.add_argument("--url", help="download from this address instead (a mirror); checksums still apply")
    parser.add_argument("--timeout", type=ranged(float, gt=0), default=30.0, help="seconds without a byte before giving up")
    parser.add_argument("--deadline", type=ranged(float, gt=0), default=1800.0, help="seconds for the whole download at most")


def main(args: argparse.Namespace) -> int:
    folder = download(args.dataset, args.cache_dir, url=args.url, timeout=args.timeout,
                      deadline=args.deadline)
    print(f"{args.dataset} is in {folder} (checksums verified). Next: "
          + SOURCES[args.dataset].prepare_hint.format(dir=folder))
    return 0
