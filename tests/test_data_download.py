"""`persona-tune download`: checksum checks against a local HTTP server, and a fast offline failure."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import socket
import subprocess
import threading
import zipfile

import pytest

from persona_tune import cli
from persona_tune.data.download import SOURCES, DownloadError, Source, download, git_blob_id


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1; yield (folder, base url)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_fails_fast_with_instructions(tmp_path, capsys):
    url = f"http://127.0.0.1:{closed_port()}/ml-1m.zip"
    with pytest.raises(DownloadError, match="cannot download .*persona-tune prepare --dataset ml-1m --data-dir DIR"):
        download("ml-1m", tmp_path / "cache", url=url, timeout=5)  # each request has a total deadline (net.py)
    rc = cli.main(["download", "--dataset", "ml-100k", "--cache-dir", str(tmp_path / "cache"), "--url", url])
    err = capsys.readouterr().err
    assert rc == 2 and "--dataset ml-100k --data-dir" in err
    assert not (tmp_path / "cache" / "ml-1m").exists()


def test_sha256_mismatch_is_refused(tmp_path, server):
    www, base = server
    files = {f"ml-100k/{n}": b"not the real file\n" for n in ("u.data", "u.item", "u.user", "u.genre")}
    (www / "ml-100k.zip").write_bytes(make_zip(files))
    source = dataclasses.replace(SOURCES["ml-100k"], zip_md5=None)  # skip the zip check, reach the file checks
    with pytest.raises(DownloadError, match=r"sha256 mismatch for .*u\.data: expected 06416e59"):
        download("ml-100k", tmp_path / "cache", url=f"{base}/ml-100k.zip", source=source)
    assert not (tmp_path / "cache" / "ml-100k").exists()


def test_zip_md5_mismatch_is_refused(tmp_path, server):
    www, base = server
    (www / "ml-1m.zip").write_bytes(make_zip({"ml-1m/movies.dat": b"1::A (1999)::Drama\n"}))
    with pytest.raises(DownloadError, match="md5 mismatch .* expected c4d9eecfca2ab87c1945afe126590906"):
        download("ml-1m", tmp_path / "cache", url=f"{base}/ml-1m.zip")
    assert not (tmp_path / "cache" / "ml-1m.zip").exists()


def test_verified_download_then_cache_hit_without_network(tmp_path, server):
    www, base = server
    content = {"movies.dat": b"1::A (1999)::Drama\n", "ratings.dat": b"1::1::5::1\n"}
    archive = make_zip({f"toy/{k}": v for k, v in content.items()} | {"../evil": b"x"})
    (www / "toy.zip").write_bytes(archive)
    source = Source(
        url=f"{base}/toy.zip", folder="toy", zip_md5=hashlib.md5(archive).hexdigest(),
        sha256={"movies.dat": hashlib.sha256(content["movies.dat"]).hexdigest()},
        git_blob={"ratings.dat": hashlib.sha1(b"blob 11\0" + content["ratings.dat"]).hexdigest()},
    )
    folder = download("toy", tmp_path / "cache", source=source)
    assert (folder / "movies.dat").read_bytes() == content["movies.dat"]
    assert not (tmp_path / "evil").exists() and not (tmp_path / "cache" / "evil").exists()
    (www / "toy.zip").unlink()  # a second call must not need the server
    assert download("toy", tmp_path / "cache", source=source) == folder


def test_git_blob_id_matches_git(tmp_path):
    path = tmp_path / "f.dat"
    path.write_bytes(b"1::1193::5::978300760\n")
    expected = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()
    assert git_blob_id(path) == expected
