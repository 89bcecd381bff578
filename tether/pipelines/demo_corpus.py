"""The demo's English text, all of it shipped inside PyPI packages (nothing downloaded):

- the `gensim` wheel's test data: a shortened Wikipedia dump, Lee news articles, labelled
  review sentences (Pang & Lee) and IMDB review snippets;
- the `chatterbot-corpus` English dialogues.

News and review sentences are split into training text and held-out prompts, so the
prompts the demo is judged on were never seen in SFT.
"""

from __future__ import annotations

import bz2
import random
import re
from dataclasses import dataclass
from pathlib import Path

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def gensim_data_dir() -> Path:
    try:
        import gensim
    except ImportError as err:
        raise ImportError("the demo corpus needs `pip install gensim` (its wheel ships the text)") from err
    return Path(gensim.__file__).parent / "test" / "test_data"


def wikipedia_paragraphs() -> list[str]:
    """Plain paragraphs of the shortened Wikipedia dump, markup and headings removed."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    paragraphs = []
    with bz2.open(gensim_data_dir() / WIKI_DUMP) as dump:
        for _title, text, _id in extract_pages(dump):
            paragraphs += [_clean_wiki_line(line) for line in filter_wiki(text).splitlines()
                           if _is_prose(line)]
    return [p for p in paragraphs if p]


def _is_prose(line: str) -> bool:
    line = line.strip()
    return len(line) > 80 and not line.startswith(("=", ":", "*", "|", "{", "!", "#", ";")) and "|" not in line


def _clean_wiki_line(line: str) -> str:
    line = line.replace("'''", "").replace("''", "\"")
    return re.sub(r"\s+", " ", re.sub(r"\([^()]*\)", "", line)).strip()


def news_articles() -> list[str]:
    lines = (gensim_data_dir() / "lee_background.cor").read_text(encoding="utf-8", errors="ignore").splitlines()
    lines += (gensim_data_dir() / "lee.cor").read_text(encoding="utf-8", errors="ignore").splitlines()
    return [re.sub(r"\s+", " ", line).strip() for line in lines if line.strip()]


def review_sentences() -> list[str]:
    """Pang & Lee polarity sentences (labels dropped) and IMDB review sentences."""
    data = gensim_data_dir()
    polarity = [re.sub(r"^__label__\w+\s+", "", line).strip()
                for line in (data / "pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines()]
    imdb = []
    for line in (data / "alldata-id-10.txt").read_text(encoding="utf-8", errors="ignore").splitlines():
        text = re.sub(r"^_\*\d+\s*", "", line)
        imdb += _SENTENCE_END.split(re.sub(r"\s+([.,!?])", r"\1", re.sub(r"\s+", " ", text)).strip())
    return [_tidy(s) for s in polarity + imdb if len(s.split()) >= 4]


def _tidy(sentence: str) -> str:
    """Review data is pre-tokenised ("funny ."); join punctuation back to its word."""
    sentence = re.sub(r"\s+([.,!?;:])", r"\1", sentence)
    sentence = re.sub(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", sentence)
    return sentence.strip()


def dialogues() -> list[str]:
    import yaml

    try:
        import chatterbot_corpus
    except ImportError as err:
        raise ImportError("the demo corpus needs `pip install chatterbot-corpus`") from err
    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    lines = []
    for file in sorted(folder.glob("*.yml")):
        for conversation in (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("conversations", []):
            lines.append(" ".join(str(turn) for turn in conversation))
    return lines


@dataclass
class DemoCorpus:
    train_texts: list[str]       # SFT documents
    train_sentences: list[str]   # news/review sentences inside the SFT text: RM and PPO prompts
    eval_sentences: list[str]    # held-out news/review sentences, never trained on: the judged prompts


def build_corpus(seed: int = 0, eval_sentences: int = 256, wiki_chars: int = 600_000) -> DemoCorpus:
    """Hold out some news and review sentences from everything; the rest joins the SFT text.

    Wikipedia is capped at `wiki_chars` so that a few minutes of SFT see mostly the news and
    review register the prompts come from.
    """
    rng = random.Random(seed)
    sentences = [s for article in news_articles() for s in _SENTENCE_END.split(article)] + review_sentences()
    sentences = [s.strip() for s in sentences if 5 <= len(s.split()) <= 60]
    rng.shuffle(sentences)
    held_out, seen = sentences[:eval_sentences], sentences[eval_sentences:]
    wiki, total = [], 0
    for paragraph in wikipedia_paragraphs():
        if total >= wiki_chars:
            break
        wiki.append(paragraph)
        total += len(paragraph)
    train = wiki + seen + dialogues()
    rng.shuffle(train)
    return DemoCorpus(train_texts=train, train_sentences=seen, eval_sentences=held_out)


def prompt_openings(sentences: list[str], words: int = 3) -> list[str]:
    """The first few words of each sentence: what the policy continues."""
    openings = []
    for sentence in sentences:
        parts = sentence.split()
        if len(parts) > words:
            openings.append(" ".join(parts[:words]))
    return openings
