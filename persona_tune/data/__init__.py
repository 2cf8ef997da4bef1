"""Rating logs in, run folders out: loaders, validation, the synthetic generator and `prepare`.

Every loader returns a :class:`RatingLog` in one normalised form (see ``loaders.py``); ``prepare``
applies the paper's protocol to it and writes the run folder files of docs/architecture.md.
"""

from persona_tune.data.loaders import (
    ML_GENRES,
    RatingLog,
    load_generic,
    load_ml100k,
    load_ml1m,
    load_ratings,
    parse_columns,
)

__all__ = [
    "ML_GENRES",
    "RatingLog",
    "load_generic",
    "load_ml100k",
    "load_ml1m",
    "load_ratings",
    "parse_columns",
]
