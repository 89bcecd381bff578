"""The doctor: reads each update's metrics and says what to change when a known PPO
failure mode shows (reward hacking, a reward that never moves, unstable steps, runaway length)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


def distinct_n(sequences: list[list[int]], n: int = 2) -> float:
    """Unique n-grams / total n-grams over a batch of token sequences (Li et al. 2016); 0 when none."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


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


class Doctor:
    """Says each symptom once when it appears, and again only after it has cleared."""

    def __init__(self, cfg: Optional[object] = None):
        self.history: list[dict] = []
        self.active: set[str] = set()

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
