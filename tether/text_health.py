"""Text-health measures of a batch of responses: what reward hacking and collapse change first
(Li et al. 2016 distinct-n; the within-response repetition of DeepSpeed-Chat's "thanks thanks
thanks" runs; which phrases spread through the responses). Pure Python on token ids and text."""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9']+")


def distinct_n(sequences: list[list[int]], n: int = 2) -> float:
    """Unique n-grams / total n-grams over a batch of token sequences (Li et al. 2016); 0 when none."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(sequences: list[list[int]], n: int = 3) -> float:
    """Mean over responses of the share of a response's n-grams that already occurred earlier in the
    same response: 0 for text that never repeats itself, → 1 for "thanks thanks thanks ...".
    Responses shorter than n tokens are left out; 0 when none is long enough."""
    rates = []
    for seq in sequences:
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        if grams:
            rates.append((len(grams) - len(set(grams))) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def phrase_shares(texts: list[str], max_words: int = 3) -> dict[str, float]:
    """Share of texts that contain each word n-gram (1..max_words words, lower-cased)."""
    counts: dict[str, int] = {}
    for text in texts:
        words = _WORD.findall(text.lower())
        grams = {" ".join(words[i : i + n]) for n in range(1, max_words + 1) for i in range(len(words) - n + 1)}
        for gram in grams:
            counts[gram] = counts.get(gram, 0) + 1
    return {gram: count / len(texts) for gram, count in counts.items()} if texts else {}


def phrase_within(phrase: str, other: str) -> bool:
    """True when `phrase` is `other` or a run of its whole words."""
    return f" {phrase} " in f" {other} "


def spreading_phrases(before: dict[str, float], after: dict[str, float], min_share: float = 0.5,
                      min_rise: float = 0.3, max_before: float = 1.0, top: int = 3) -> list[tuple[str, float, float]]:
    """(phrase, share before, share after) for phrases that were in at most `max_before` of the texts
    and are now in at least `min_share`, a rise of at least `min_rise`; a phrase inside a longer one
    whose rise explains its own ("the" inside "the united states") is left out."""
    risen = [(gram, before.get(gram, 0.0), share) for gram, share in after.items()]
    risen = [(gram, was, now) for gram, was, now in risen
             if now >= min_share and now - was >= min_rise and was <= max_before]
    kept: list[tuple[str, float, float]] = []
    for gram, was, now in sorted(risen, key=lambda item: (-len(item[0].split()), -item[2])):
        explained = any(phrase_within(gram, longer) and now - was <= longer_now - longer_was + 0.1
                        for longer, longer_was, longer_now in kept)
        if not explained:
            kept.append((gram, was, now))
    kept.sort(key=lambda item: (-(item[2] - item[1]), -len(item[0])))
    return kept[:top]


