"""The doctor: reads each update's metrics and responses and says what to change when a known
PPO failure mode shows (reward hacking, a reward that never moves, unstable steps, runaway
length, one phrase spreading through the responses)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

_WORD = re.compile(r"[a-z0-9']+")


def distinct_n(sequences: list[list[int]], n: int = 2) -> float:
    """Unique n-grams / total n-grams over a batch of token sequences (Li et al. 2016); 0 when none."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def phrase_shares(texts: list[str], max_words: int = 3) -> dict[str, float]:
    """Share of texts that contain each word n-gram (1..max_words words, lower-cased)."""
    counts: dict[str, int] = {}
    for text in texts:
        words = _WORD.findall(text.lower())
        grams = {" ".join(words[i : i + n]) for n in range(1, max_words + 1) for i in range(len(words) - n + 1)}
        for gram in grams:
            counts[gram] = counts.get(gram, 0) + 1
    return {gram: count / len(texts) for gram, count in counts.items()} if texts else {}


def _within(phrase: str, other: str) -> bool:
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
        explained = any(_within(gram, longer) and now - was <= longer_now - longer_was + 0.1
                        for longer, longer_was, longer_now in kept)
        if not explained:
            kept.append((gram, was, now))
    kept.sort(key=lambda item: (-(item[2] - item[1]), -len(item[0])))
    return kept[:top]


@dataclass(frozen=True)
class Symptom:
    name: str
    advice: str
    present: Callable[[dict, dict, list[dict]], bool]  # (metrics now, baseline, history) -> bool


def _score_gain(now: dict, base: dict) -> float:
    spread = max(base.get("reward/score_std", 0.0), 1e-6)
    return (now["reward/score"] - base["reward/score"]) / spread


def _hacking(now: dict, base: dict, history: list[dict]) -> bool:
    degenerate = now["response/distinct_2"] < 0.6 * base["response/distinct_2"]
    return _score_gain(now, base) > 1.0 and degenerate


def _flat(now: dict, base: dict, history: list[dict]) -> bool:
    if len(history) < 15:
        return False
    recent = history[-5:]
    gain = sum(_score_gain(m, base) for m in recent) / len(recent)
    tiny_steps = sum(m["policy/approx_kl"] for m in recent) / len(recent) < 1e-4
    return abs(gain) < 0.1 and tiny_steps


def _unstable(now: dict, base: dict, history: list[dict]) -> bool:
    return now["policy/ratio_mean"] > 2 or now["policy/approx_kl"] > 0.1 or now["policy/clipfrac"] > 0.3


def _runaway_length(now: dict, base: dict, history: list[dict]) -> bool:
    return base["response/eos_rate"] > 0.2 and now["response/eos_rate"] < 0.5 * base["response/eos_rate"]


SYMPTOMS = (
    Symptom("reward_hacking", "reward rises while responses repeat themselves (distinct-2 fell below 60% of its "
            "start): raise kl_coef (or set adaptive_kl=true with a kl_target) or lower clip_eps; check the reward "
            "for what it pays for", _hacking),
    Symptom("reward_flat", "the score has not moved in 15 updates and the policy barely changes (approx_kl < 1e-4): "
            "raise learning_rate or clip_eps", _flat),
    Symptom("unstable", "steps are too large (mean ratio > 2, approx_kl > 0.1 or clipfrac > 0.3): lower "
            "learning_rate or clip_eps, or set target_kl_stop", _unstable),
    Symptom("runaway_length", "fewer than half as many responses end with EOS as at the start: the policy runs into "
            "max_new_tokens; set missing_eos_penalty or raise kl_coef", _runaway_length),
)


PHRASE_ADVICE = ("the policy is earning its reward with one phrase, a common form of reward hacking: check whether "
                 "the reward should pay for it, raise kl_coef or entropy_coef, or add ptx_data")


class Doctor:
    """Says each symptom once when it appears, and again only after it has cleared."""

    def __init__(self, cfg: Optional[object] = None):
        self.history: list[dict] = []
        self.active: set[str] = set()
        self.first_shares: Optional[dict[str, float]] = None
        self.named_phrases: set[str] = set()

    def state_dict(self) -> dict:
        """Its memory (JSON-serialisable): a resumed run names nothing twice and compares with the same start."""
        return {"history": self.history, "active": sorted(self.active), "first_shares": self.first_shares,
                "named_phrases": sorted(self.named_phrases)}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])
        self.active = set(state["active"])
        self.first_shares = state["first_shares"]
        self.named_phrases = set(state["named_phrases"])

    def check_phrases(self, update: int, responses: list[str]) -> list[str]:
        """Names a phrase that has spread from few responses (≤ 10%) to most of them, once: a phrase
        that overlaps one already named ("united" after "the united states") is the same habit."""
        shares = phrase_shares(responses)
        if self.first_shares is None:
            self.first_shares = shares
            return []
        messages = []
        for phrase, was, now in spreading_phrases(self.first_shares, shares, max_before=0.1):
            if not any(_within(phrase, named) or _within(named, phrase) for named in self.named_phrases):
                self.named_phrases.add(phrase)
                messages.append(f"update {update}: phrase_spreading: \"{phrase}\" is in {now:.0%} of responses "
                                f"({was:.0%} at the start): {PHRASE_ADVICE}")
        return messages

    def check(self, update: int, metrics: dict) -> list[str]:
        self.history.append(metrics)
        base = self.history[0]
        messages = []
        for symptom in SYMPTOMS:
            if symptom.present(metrics, base, self.history):
                if symptom.name not in self.active:
                    messages.append(f"update {update}: {symptom.name}: {symptom.advice}")
                self.active.add(symptom.name)
            else:
                self.active.discard(symptom.name)
        return messages
