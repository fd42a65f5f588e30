"""The general replay set and the held-out general text (Wikipedia paragraphs).

Held-out text comes from whole articles that contribute nothing to the replay set, so
held-out perplexity is not measured on paragraphs whose neighbours were replayed. Any
paragraph sharing a 13-word run with any task or MMLU source row is dropped first, so
neither set can leak task text (BoolQ passages are Wikipedia paragraphs too).
"""
from __future__ import annotations

import random

from gere_assets.overlap import OverlapIndex
from gere_assets.wikitext import Article
from gere_ds.errors import InputError


def drop_overlapping(articles: list[Article], index: OverlapIndex) -> tuple[list[Article], int]:
    """Articles with every paragraph that overlaps the index removed (and exact repeats)."""
    kept: list[Article] = []
    dropped = 0
    seen: set[str] = set()
    for article in articles:
        paragraphs = []
        for para in article.paragraphs:
            if para in seen or index.overlaps(para):
                dropped += 1
                continue
            seen.add(para)
            paragraphs.append(para)
        if paragraphs:
            kept.append(Article(article.title, paragraphs))
    return kept, dropped


def split_general(articles: list[Article], replay_size: int, heldout_size: int, seed: int,
                  heldout_per_article: int = 25) -> tuple[list[str], list[str], list[str]]:
    """(replay, heldout, heldout article titles), seeded and article-disjoint.

    Held-out articles are drawn in shuffled order, taking at most ``heldout_per_article``
    paragraphs from each so the held-out text spans many topics.
    """
    rng = random.Random(f"{seed}/general")
    order = sorted(articles, key=lambda a: a.title)
    rng.shuffle(order)
    heldout: list[str] = []
    titles: list[str] = []
    rest: list[Article] = []
    for article in order:
        if len(heldout) < heldout_size:
            take = min(heldout_per_article, heldout_size - len(heldout), len(article.paragraphs))
            heldout.extend(rng.sample(article.paragraphs, take))
            titles.append(article.title)
        else:
            rest.append(article)
    # Articles quote each other (lead paragraphs reused in overview articles): also drop
    # replay candidates sharing a 13-word run with the held-out text.
    heldout_index = OverlapIndex(heldout)
    pool = [para for article in rest for para in article.paragraphs if not heldout_index.overlaps(para)]
    if len(heldout) < heldout_size or len(pool) < replay_size:
        total = sum(len(a.paragraphs) for a in articles)
        raise InputError(f"only {total} usable Wikipedia paragraphs, too few for replay {replay_size} + "
                         f"held-out {heldout_size}; lower --replay-size/--heldout-size", field="general")
    replay = rng.sample(pool, replay_size)
    return replay, heldout, titles
