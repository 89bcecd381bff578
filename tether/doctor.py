"""The doctor: reads every row a PPO run logs — live, or afterwards from its metrics.jsonl
(`tether doctor RUN_DIR`) — and names the failure modes PPO users learn the hard way, each with
a severity, the evidence (which metrics, at which updates, with their values) and the settings
to change. Every rule and threshold is documented in docs/doctor.md, rendered from this module
(`python -m tether.doctor > docs/doctor.md`); every threshold is a key of the `doctor` option.

Rules read only logged metrics, so replaying a run's metrics.jsonl finds what the live run found.
Two findings need what metrics.jsonl does not hold (the responses of a spreading phrase, the
reason of a skipped update): they come from the run's doctor.jsonl."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from tether.report import fit_gao_rl  # numpy only; the report module draws lazily
from tether.text_health import phrase_shares, phrase_within, spreading_phrases

SEVERITIES = ("info", "warning", "critical")


def _threshold(default: float, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DoctorThresholds:
    """Every number a rule compares with. Set any of them with the `doctor` option, e.g.
    `doctor='{flat_updates: 30}'` or, in YAML, `doctor: {flat_updates: 30}`."""

    window: int = _threshold(3, "Updates averaged on each side of a comparison: 'the start' is the mean of the "
                                "first `window` updates, 'now' the mean of the last `window` (single updates are noisy).")
    critical_after: int = _threshold(3, "A reward_hacking or reward_model_exploited finding that has held this many "
                                        "updates in a row becomes critical.")
    hacking_score_gain: float = _threshold(1.0, "reward_hacking: the score has risen by at least this many of the "
                                                "start's score standard deviations (`reward/score_std`).")
    hacking_distinct_fraction: float = _threshold(0.6, "reward_hacking: `response/distinct_2` at most this fraction "
                                                       "of the start's.")
    hacking_repetition_rise: float = _threshold(0.15, "reward_hacking: `response/repeated_3gram_rate` at least this "
                                                      "much above the start's (absolute).")
    hacking_perplexity_factor: float = _threshold(2.0, "reward_hacking: `response/ref_perplexity` at least this many "
                                                       "times the start's (gibberish the reference would not write).")
    collapse_perplexity_fraction: float = _threshold(0.5, "reward_hacking: `response/ref_perplexity` at most this "
                                                          "fraction of the start's while `response/length` grew by "
                                                          "`collapse_length_growth` (the collapse of Secrets of RLHF).")
    collapse_length_growth: float = _threshold(1.2, "reward_hacking: the length growth (a factor) that goes with a "
                                                    "collapsing perplexity.")
    flat_updates: int = _threshold(15, "reward_flat: the number of latest updates over which the score must not "
                                       "have moved.")
    flat_score_change: float = _threshold(0.5, "reward_flat: the score moved by less than this many start standard "
                                               "deviations between the first and last `window` of those updates.")
    flat_approx_kl: float = _threshold(1e-4, "reward_flat: mean `policy/approx_kl` below this means the steps are "
                                             "too small (the learning rate).")
    flat_clipfrac: float = _threshold(0.2, "reward_flat: mean `policy/clipfrac` at least this means the clip range "
                                           "cuts most of each step (the clip range).")
    unstable_approx_kl: float = _threshold(0.1, "unstable: `policy/approx_kl` at least this (nats per token, one "
                                                "update).")
    unstable_clipfrac: float = _threshold(0.3, "unstable: `policy/clipfrac` at least this.")
    unstable_ratio: float = _threshold(0.2, "unstable: `policy/ratio_mean` at least this far from 1.")
    unstable_ratio_max: float = _threshold(10.0, "unstable: `policy/ratio_max` at least this (one token's probability "
                                                 "multiplied this many times within one update; a clip range that "
                                                 "never clips lets it run away).")
    unstable_critical_approx_kl: float = _threshold(1.0, "unstable becomes critical: `policy/approx_kl` at least "
                                                         "this (the policy moved by a nat per token in one update).")
    exploit_gold_drop: float = _threshold(0.3, "reward_model_exploited: the gold score has given back at least this "
                                               "fraction of what it had gained by its best (window means), while the "
                                               "proxy score did not fall.")
    exploit_gold_noise_z: float = _threshold(3.0, "reward_model_exploited: the gold score's fall must also be at "
                                                  "least this many standard errors of the difference of the two "
                                                  "window means (from `gold/score_std` over `batch/responses`): "
                                                  "the best window is the highest of many noisy ones.")
    gold_peak_margin: float = _threshold(1.25, "reward_model_exploited: √KL of the latest evaluation at least this "
                                               "many times the peak of the Gao et al. (2022) curve fitted to the "
                                               "evaluations (at least 3, the peak inside the observed range).")
    mismatch_approx_kl: float = _threshold(1e-4, "logprob_mismatch: `policy/first_minibatch_approx_kl` above this "
                                                 "(it is 0 when rollout and training compute the same log-probs; "
                                                 "bf16 rounding stays far below).")
    mismatch_approx_kl_bf16: float = _threshold(1e-3, "logprob_mismatch under precision bf16-mixed or bf16-true: "
                                                      "the first minibatch is scored in a different batch shape "
                                                      "(and with grad) from the rollout unless the rollout's forward "
                                                      "is reused, and GPU bf16 kernels may round differently per "
                                                      "shape. On CPU it measured exactly 0 (docs/scaling.md); this "
                                                      "bound is provisional until measured on a GPU.")
    mismatch_ratio: float = _threshold(1e-2, "logprob_mismatch: `policy/first_minibatch_ratio_mean` further than "
                                             "this from 1.")
    critic_ev_updates: int = _threshold(10, "critic_not_learning: the latest updates whose mean "
                                            "`value/explained_variance` is at or below `critic_ev_max`.")
    critic_ev_max: float = _threshold(-0.05, "critic_not_learning: the mean explained variance that counts as not "
                                             "learning. Near 0 the critic predicts the mean return, a constant "
                                             "baseline that does no harm; below 0 its values add variance to the "
                                             "advantages.")
    entropy_fraction: float = _threshold(0.1, "entropy_collapse: `policy/entropy` at most this fraction of the start's.")
    grad_spike_factor: float = _threshold(10.0, "grad_norm_spike: `policy/grad_norm` at least this many times the "
                                                "median of the previous `grad_spike_history` updates, and above "
                                                "`max_grad_norm`.")
    grad_spike_history: int = _threshold(5, "grad_norm_spike: updates in that median (the rule waits for them).")
    engine_gap_min: float = _threshold(0.02, "engine_gap_growing: `generation/logprob_gap` at least this (nats per "
                                             "token)...")
    engine_gap_growth: float = _threshold(2.0, "engine_gap_growing: ...and at least this many times the start's.")
    truncation_gap_max: float = _threshold(0.05, "truncated_sampling: `generation/truncation_gap` above this (nats per "
                                                 "response token).")
    eos_start_min: float = _threshold(0.2, "runaway_length: watched only when at least this share of the start's "
                                           "responses ended with EOS.")
    eos_fraction: float = _threshold(0.5, "runaway_length: `response/eos_rate` at most this fraction of the start's.")
    phrase_share: float = _threshold(0.5, "phrase_spreading: a phrase now in at least this share of the responses...")
    phrase_rise: float = _threshold(0.3, "phrase_spreading: ...risen by at least this share...")
    phrase_max_before: float = _threshold(0.1, "phrase_spreading: ...from at most this share at the first update.")


THRESHOLD_NAMES = tuple(f.name for f in dataclasses.fields(DoctorThresholds))
SIGNED_THRESHOLDS = frozenset({"critic_ev_max"})  # an explained variance may be negative


def thresholds_from(overrides: Optional[dict]) -> DoctorThresholds:
    """DoctorThresholds with `overrides` applied; ValueError naming an unknown key or a bad value."""
    import difflib

    overrides = dict(overrides or {})
    for key, value in overrides.items():
        if key not in THRESHOLD_NAMES:
            close = difflib.get_close_matches(key, THRESHOLD_NAMES, n=2)
            hint = f"did you mean {', '.join(close)}?" if close else "see docs/doctor.md for the thresholds"
            raise ValueError(f"doctor: unknown threshold {key!r}; {hint}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"doctor: threshold {key} must be a number, got {value!r}")
        if value < 0 and key not in SIGNED_THRESHOLDS:
            raise ValueError(f"doctor: threshold {key} must be >= 0, got {value!r}")
        default = DoctorThresholds.__dataclass_fields__[key].default
        if isinstance(default, int) and (value != int(value) or value < 1):
            raise ValueError(f"doctor: threshold {key} counts updates: a whole number >= 1, got {value!r}")
        overrides[key] = type(default)(value)
    thresholds = DoctorThresholds(**overrides)
    if thresholds.flat_updates < 2 * thresholds.window:
        raise ValueError(f"doctor: flat_updates={thresholds.flat_updates} must be at least 2 x window="
                         f"{thresholds.window} (reward_flat compares the first and last window of those updates)")
    return thresholds


# --- findings ----------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _span(updates: tuple[int, int]) -> str:
    return f"update {updates[0]}" if updates[0] == updates[1] else f"updates {updates[0]}-{updates[1]}"


@dataclass(frozen=True)
class Evidence:
    """One metric's value now (and at the start, when the rule compares), with the bound it crossed."""

    metric: str
    value: float
    updates: tuple[int, int]
    bound: str = ""
    start: Optional[float] = None
    start_updates: Optional[tuple[int, int]] = None

    def text(self) -> str:
        was = f"{_fmt(self.start)} ({_span(self.start_updates)}) -> " if self.start is not None else ""
        bound = f" [{self.bound}]" if self.bound else ""
        return f"{self.metric} {was}{_fmt(self.value)} ({_span(self.updates)}){bound}"

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if v not in (None, "")}


@dataclass(frozen=True)
class Advice:
    """A setting to change: which key, which way, roughly how much."""

    key: str
    change: str  # "raise" | "lower" | "set" | "check"
    how: str

    def text(self) -> str:
        return f"{self.change} {self.key} {self.how}".strip()


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    update: int
    summary: str
    evidence: tuple[Evidence, ...] = ()
    advice: tuple[Advice, ...] = ()

    @property
    def message(self) -> str:
        parts = [f"update {self.update}: {self.rule} ({self.severity}): {self.summary}"]
        if self.evidence:
            parts.append("evidence: " + "; ".join(e.text() for e in self.evidence))
        if self.advice:
            parts.append("change: " + "; ".join(a.text() for a in self.advice))
        return ". ".join(parts)

    def to_dict(self) -> dict:
        return {"update": self.update, "rule": self.rule, "severity": self.severity, "summary": self.summary,
                "evidence": [e.to_dict() for e in self.evidence],
                "advice": [dataclasses.asdict(a) for a in self.advice], "message": self.message}


@dataclass(frozen=True)
class Diagnosis:
    """What a rule returns when it fires; the doctor dates it and decides whether it is new."""

    severity: str
    summary: str
    evidence: tuple[Evidence, ...]
    advice: tuple[Advice, ...]


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)


# --- reading the logged rows ---------------------------------------------------------------


def _number(value: Any) -> Optional[float]:
    """A finite float, or None (metrics.jsonl writes NaN/inf as strings)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class History:
    """The rows a rule reads: PPO updates (`rows`), evaluations (`evals`), the config and thresholds."""

    def __init__(self, rows: list[dict], evals: list[dict], config: dict, t: DoctorThresholds):
        self.rows, self.evals, self.config, self.t = rows, evals, config, t

    def mean(self, key: str, rows: list[dict]) -> Optional[float]:
        values = [_number(r.get(key)) for r in rows]
        return None if not values or None in values else sum(values) / len(values)

    def start(self, key: str) -> Optional[Evidence]:
        """The mean of the first `window` updates (None until there are 2 x window of them)."""
        if len(self.rows) < 2 * self.t.window:
            return None
        return self._evidence(key, self.rows[: self.t.window])

    def now(self, key: str) -> Optional[Evidence]:
        return self._evidence(key, self.rows[-self.t.window :]) if len(self.rows) >= self.t.window else None

    def _evidence(self, key: str, rows: list[dict]) -> Optional[Evidence]:
        value = self.mean(key, rows)
        return None if value is None else Evidence(key, value, (rows[0]["update"], rows[-1]["update"]))

    def compare(self, key: str, bound: str) -> Optional[Evidence]:
        """Now against the start, as one piece of evidence (None while either is missing)."""
        start, now = self.start(key), self.now(key)
        if start is None or now is None:
            return None
        return dataclasses.replace(now, bound=bound, start=start.value, start_updates=start.updates)

    def latest(self, key: str) -> Optional[Evidence]:
        row = self.rows[-1] if self.rows else {}
        value = _number(row.get(key))
        return None if value is None else Evidence(key, value, (row["update"], row["update"]))

    def setting(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    def score_spread(self) -> float:
        start = self.start("reward/score_std")
        return max(start.value if start else 0.0, 1e-6)


# --- the rules ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    name: str
    watches: str  # what it looks at and why, for docs/doctor.md
    thresholds: tuple[str, ...]
    check: Callable[[History], Optional[Diagnosis]]
    escalates: bool = False  # held for critical_after updates in a row: critical


def _kl_advice(h: History) -> Advice:
    beta = h.setting("kl_coef", 0.05)
    if not beta:
        return Advice("kl_coef", "raise", "from 0 to 0.05-0.2 (or adaptive_kl=true with a kl_target of a few nats)")
    return Advice("kl_coef", "raise", f"from {_fmt(beta)} to {_fmt(3 * beta)}-{_fmt(10 * beta)} "
                  "(or adaptive_kl=true with a lower kl_target)")


def _clip_advice(h: History, lower_to: float = 0.1) -> Advice:
    eps = h.setting("clip_eps", 0.2)
    return Advice("clip_eps", "lower", f"from {_fmt(eps)} to {_fmt(min(lower_to, eps / 2))}")


def _lr_down(h: History, factor: str = "3-10x") -> Advice:
    return Advice("learning_rate", "lower", f"from {_fmt(h.setting('learning_rate', 1e-5))} by {factor}")


def reward_hacking(h: History) -> Optional[Diagnosis]:
    t = h.t
    score = h.compare("reward/score", f">= start + {_fmt(t.hacking_score_gain)} x start score std")
    if score is None or (score.value - score.start) / h.score_spread() < t.hacking_score_gain:
        return None
    degraded = []
    distinct = h.compare("response/distinct_2", f"<= {_fmt(t.hacking_distinct_fraction)} x start")
    if distinct and distinct.value <= t.hacking_distinct_fraction * distinct.start:
        degraded.append(distinct)
    repeated = h.compare("response/repeated_3gram_rate", f">= start + {_fmt(t.hacking_repetition_rise)}")
    if repeated and repeated.value >= repeated.start + t.hacking_repetition_rise:
        degraded.append(repeated)
    perplexity = h.compare("response/ref_perplexity", f">= {_fmt(t.hacking_perplexity_factor)} x start")
    length = h.compare("response/length", f">= {_fmt(t.collapse_length_growth)} x start")
    if perplexity and perplexity.value >= t.hacking_perplexity_factor * perplexity.start:
        degraded.append(perplexity)
    elif (perplexity and length and perplexity.value <= t.collapse_perplexity_fraction * perplexity.start
          and length.value >= t.collapse_length_growth * length.start):
        degraded += [dataclasses.replace(perplexity, bound=f"<= {_fmt(t.collapse_perplexity_fraction)} x start"),
                     length]
    if not degraded:
        return None
    kl = h.latest("kl/mean")
    return Diagnosis("warning", "the reward rises while the text degrades: the policy is exploiting the reward "
                     "instead of improving (reward hacking)", (score, *degraded, *([kl] if kl else [])),
                     (_kl_advice(h), _clip_advice(h),
                      Advice("reward_fn/reward_model", "check", "— what it pays for in samples.jsonl")))


def reward_flat(h: History) -> Optional[Diagnosis]:
    t = h.t
    warmup = h.setting("critic_warmup_updates", 0) or 0  # the policy is held still on purpose then
    trained = [r for r in h.rows if r["update"] > warmup]
    if len(trained) < t.flat_updates:
        return None
    recent = History(trained[-t.flat_updates :], [], h.config, t)
    score = recent.compare("reward/score", f"moved < {_fmt(t.flat_score_change)} x start score std")
    if score is None or abs(score.value - score.start) / h.score_spread() >= t.flat_score_change:
        return None
    since_start = h.compare("reward/score", "")
    if since_start and abs(since_start.value - since_start.start) / h.score_spread() >= t.flat_score_change:
        return None  # it rose (or fell) earlier and has levelled off: converged, not stalled
    span = (recent.rows[0]["update"], recent.rows[-1]["update"])
    kl_value, clip_value = recent.mean("policy/approx_kl", recent.rows), recent.mean("policy/clipfrac", recent.rows)
    if kl_value is None or clip_value is None:
        return None
    summary = f"the score has not moved in {t.flat_updates} updates"
    if kl_value < t.flat_approx_kl:
        lr = h.setting("learning_rate", 1e-5)
        return Diagnosis("warning", summary + ": the policy barely changes, the learning rate is too low",
                         (score, Evidence("policy/approx_kl", kl_value, span, f"< {_fmt(t.flat_approx_kl)}")),
                         (Advice("learning_rate", "raise", f"from {_fmt(lr)} by 10-100x (PPO on LMs: 1e-6-1e-5 full "
                                 "fine-tuning, 1e-5-1e-4 LoRA)"),))
    if clip_value >= t.flat_clipfrac:
        eps = h.setting("clip_eps", 0.2)
        return Diagnosis("warning", summary + ": most of each step is clipped away, the clip range is too small",
                         (score, Evidence("policy/clipfrac", clip_value, span, f">= {_fmt(t.flat_clipfrac)}")),
                         (Advice("clip_eps", "raise", f"from {_fmt(eps)} toward 0.2-0.3"),))
    return None  # the policy moves at a normal pace: the reward may simply have nothing left to give


def unstable(h: History) -> Optional[Diagnosis]:
    t = h.t
    evidence = []
    kl, clip, ratio = h.latest("policy/approx_kl"), h.latest("policy/clipfrac"), h.latest("policy/ratio_mean")
    if kl and kl.value >= t.unstable_approx_kl:
        evidence.append(dataclasses.replace(kl, bound=f">= {_fmt(t.unstable_approx_kl)}"))
    if clip and clip.value >= t.unstable_clipfrac:
        evidence.append(dataclasses.replace(clip, bound=f">= {_fmt(t.unstable_clipfrac)}"))
    if ratio and abs(ratio.value - 1) >= t.unstable_ratio:
        evidence.append(dataclasses.replace(ratio, bound=f"|ratio - 1| >= {_fmt(t.unstable_ratio)}"))
    largest = h.latest("policy/ratio_max")
    if largest and largest.value >= t.unstable_ratio_max:
        evidence.append(dataclasses.replace(largest, bound=f">= {_fmt(t.unstable_ratio_max)}"))
        largest = None
    if not evidence:
        return None
    critical = kl is not None and kl.value >= t.unstable_critical_approx_kl
    eps = h.setting("clip_eps", 0.2)
    clip_advice = (Advice("clip_eps", "lower", f"from {_fmt(eps)} to 0.1-0.2 (the clip is what bounds a step)")
                   if eps > 0.3 else _clip_advice(h))
    return Diagnosis("critical" if critical else "warning", "the steps are too large: each update moves the policy "
                     "far from the one that sampled the batch (unstable training)",
                     (*evidence, *([largest] if largest else [])),
                     (_lr_down(h), clip_advice, Advice("target_kl_stop", "set", "to ~0.02-0.05 (stops an update's "
                                                       "remaining minibatches)")))


def reward_model_exploited(h: History) -> Optional[Diagnosis]:
    return _gold_falling(h) or _past_gold_peak(h)


def _gold_falling(h: History) -> Optional[Diagnosis]:
    t, w = h.t, h.t.window
    rows = [r for r in h.rows if _number(r.get("gold/score")) is not None and _number(r.get("reward/score")) is not None]
    if len(rows) < 3 * w:
        return None
    gold = [sum(_number(r["gold/score"]) for r in rows[i - w : i]) / w for i in range(w, len(rows) + 1)]
    proxy = [sum(_number(r["reward/score"]) for r in rows[i - w : i]) / w for i in range(w, len(rows) + 1)]
    best = max(range(len(gold)), key=gold.__getitem__)
    gained, lost = gold[best] - gold[0], gold[best] - gold[-1]
    if gained <= 0 or lost < t.exploit_gold_drop * gained or proxy[-1] < proxy[best]:
        return None
    noise = _window_mean_variance(rows[best : best + w]) + _window_mean_variance(rows[-w:])
    if lost < t.exploit_gold_noise_z * math.sqrt(noise):
        return None

    def at(i: int) -> tuple[int, int]:
        return rows[i]["update"], rows[i + w - 1]["update"]

    severity = "critical" if gold[-1] < gold[0] else "warning"
    bound = f"gave back >= {_fmt(t.exploit_gold_drop)} of its gain" + (
        f", {_fmt(lost / math.sqrt(noise))} standard errors" if noise > 0 else "")
    return Diagnosis(severity, "the proxy reward keeps rising while the gold reward falls: the policy exploits "
                     "the reward model's errors (over-optimisation, Gao et al. 2022)",
                     (Evidence("gold/score", gold[-1], at(len(gold) - 1), bound, gold[best], at(best)),
                      Evidence("reward/score", proxy[-1], at(len(proxy) - 1), "did not fall", proxy[best], at(best))),
                     _exploit_advice(h, best_update=at(best)[1]))


def _window_mean_variance(rows: list[dict]) -> float:
    """Sampling variance of the mean gold score over `rows` (0 for runs that did not log its spread)."""
    spreads = [(_number(r.get("gold/score_std")), _number(r.get("batch/responses"))) for r in rows]
    if any(std is None or not n for std, n in spreads):
        return 0.0
    return sum(std * std / n for std, n in spreads) / len(rows) ** 2


def _past_gold_peak(h: History) -> Optional[Diagnosis]:
    points = [(r["update"], _number(r.get("eval/kl")), _number(r.get("eval/gold"))) for r in h.evals]
    points = [(u, kl, gold) for u, kl, gold in points if kl is not None and gold is not None]
    if len(points) < 4:  # the start and at least 3 with KL > 0
        return None
    import numpy as np

    d = np.sqrt(np.maximum([kl for _, kl, _ in points], 0.0))
    gain = np.array([gold for _, _, gold in points]) - points[0][2]
    fit = fit_gao_rl(d, gain)
    if fit is None or fit.peak_d is None or fit.peak_d > d.max() or d[-1] < h.t.gold_peak_margin * fit.peak_d:
        return None
    update = points[-1][0]
    return Diagnosis("warning", f"the held-out KL is past the peak of the gold curve fitted to the evaluations "
                     f"(Gao et al. 2022: peak at KL {_fmt(fit.peak_d ** 2)} nats): more optimisation now lowers the "
                     "gold reward", (Evidence("eval/kl", float(d[-1] ** 2), (update, update),
                                              f"√KL >= {_fmt(h.t.gold_peak_margin)} x peak √KL {_fmt(fit.peak_d)}"),
                                     Evidence("eval/gold", points[-1][2], (update, update))),
                     _exploit_advice(h, best_update=None, target_kl=fit.peak_d ** 2))


def _exploit_advice(h: History, best_update: Optional[int], target_kl: Optional[float] = None) -> tuple[Advice, ...]:
    keep = (Advice("checkpoint", "check", f"— keep the one nearest update {best_update}, where the gold reward was "
                   "best (save_every)") if best_update is not None else
            Advice("total_updates", "lower", "to stop near the peak (or keep an earlier checkpoint)"))
    kl_target = (Advice("kl_target", "set", f"to ~{_fmt(target_kl)} nats with adaptive_kl=true")
                 if target_kl is not None else _kl_advice(h))
    return (kl_target, keep, Advice("reward_model", "check", "— retrain it with more or harder preference pairs "
                                    "where it is exploited (its samples score high but read badly)"))


def logprob_mismatch(h: History) -> Optional[Diagnosis]:
    t = h.t
    kl, ratio = h.latest("policy/first_minibatch_approx_kl"), h.latest("policy/first_minibatch_ratio_mean")
    bf16 = str(h.config.get("precision", "")).startswith("bf16")
    limit = t.mismatch_approx_kl_bf16 if bf16 else t.mismatch_approx_kl
    evidence = []
    if kl and kl.value > limit:
        evidence.append(dataclasses.replace(kl, bound=f"> {_fmt(limit)}; 0 when consistent"
                                            + (" (up to bf16 rounding)" if bf16 else "")))
    if ratio and abs(ratio.value - 1) > t.mismatch_ratio:
        evidence.append(dataclasses.replace(ratio, bound=f"|ratio - 1| > {_fmt(t.mismatch_ratio)}; 1 when consistent"))
    if not evidence:
        return None
    return Diagnosis("critical", "the first minibatch of the update already differs from the rollout: log-probs are "
                     "computed differently when sampling and when training (a setup bug; every update is biased)",
                     tuple(evidence),
                     (Advice("dropout", "check", "is off in the policy (a model with dropout on in train mode)"),
                      Advice("temperature", "check", "is the same for sampling and for the log-probs (tether divides "
                             "the logits by it in both)"),
                      Advice("policy", "check", "for layers that behave differently in train and eval mode, or a "
                             "custom forward that changes the logits")))


def critic_not_learning(h: History) -> Optional[Diagnosis]:
    t = h.t
    rows = h.rows[-t.critic_ev_updates :]
    values = [_number(r.get("value/explained_variance")) for r in rows]
    if len(rows) < t.critic_ev_updates or None in values:
        return None
    mean = sum(values) / len(values)  # a mean: single updates of a critic that learns nothing sit at +-1e-6
    if mean > t.critic_ev_max:
        return None
    span = (rows[0]["update"], rows[-1]["update"])
    own = h.setting("critic_learning_rate")
    lr = own or h.setting("learning_rate", 1e-5)
    if lr < 1e-6:  # far below any critic that learns: the rate, not the critic, is the problem
        rate = Advice("critic_learning_rate", "set" if own is None else "raise",
                      f"to ~1e-5-1e-4 (it is {_fmt(lr)}" + (", learning_rate's)" if own is None else ")"))
    else:
        rate = Advice("critic_learning_rate", "raise", f"from {_fmt(lr)} by 3-10x")
    return Diagnosis("warning", f"the critic has explained none of the returns' variance over {t.critic_ev_updates} "
                     "updates: the advantages are noise",
                     (Evidence("value/explained_variance", mean, span, f"mean <= {_fmt(t.critic_ev_max)}"),),
                     (rate, Advice("critic_warmup_updates", "set", "to 5-20 (the critic learns before the policy moves)"),
                      Advice("advantage_estimator", "set", "to grpo or rloo with samples_per_prompt >= 4 if the "
                             "critic cannot learn this reward")))


def entropy_collapse(h: History) -> Optional[Diagnosis]:
    t = h.t
    entropy = h.compare("policy/entropy", f"<= {_fmt(t.entropy_fraction)} x start")
    if entropy is None or entropy.start <= 0 or entropy.value > t.entropy_fraction * entropy.start:
        return None
    return Diagnosis("warning", "the policy's entropy has collapsed: it samples nearly the same tokens every time "
                     "and stops exploring", (entropy,),
                     (Advice("entropy_coef", "raise", f"from {_fmt(h.setting('entropy_coef', 0.0))} to ~0.001-0.01"),
                      _lr_down(h, "2-3x"), _kl_advice(h)))


def grad_norm_spike(h: History) -> Optional[Diagnosis]:
    t = h.t
    norms = [_number(r.get("policy/grad_norm")) for r in h.rows[-(t.grad_spike_history + 1) :]]
    if len(norms) < t.grad_spike_history + 1 or None in norms:
        return None
    median, clip = statistics.median(norms[:-1]), h.setting("max_grad_norm", 1.0)
    # A jump that stays under max_grad_norm reaches the weights as it is meant to; one past it is cut
    # down to the clip, and the update follows the few responses that made it.
    if median <= 0 or norms[-1] < t.grad_spike_factor * median or (clip and norms[-1] <= clip):
        return None
    first = h.rows[-(t.grad_spike_history + 1)]["update"]
    return Diagnosis("warning", "the policy gradient norm spiked past max_grad_norm: a few responses dominate the "
                     "update", (Evidence("policy/grad_norm", norms[-1], (h.rows[-1]["update"],) * 2,
                                         f">= {_fmt(t.grad_spike_factor)} x median and > max_grad_norm {_fmt(clip)}",
                                         median, (first, h.rows[-2]["update"])),),
                     (_lr_down(h, "2-3x"), Advice("score_clip", "set", "(e.g. 5) or normalize_scores=true, if a few "
                                                  "scores are extreme")))


def engine_gap_growing(h: History) -> Optional[Diagnosis]:
    t = h.t
    gap = h.compare("generation/logprob_gap", f">= {_fmt(t.engine_gap_growth)} x start and >= {_fmt(t.engine_gap_min)}")
    if gap is None or gap.value < t.engine_gap_min or gap.value < t.engine_gap_growth * gap.start:
        return None
    return Diagnosis("warning", "the generation engine's log-probs drift from the trainer's: it samples from a "
                     "policy the trainer no longer has", (gap,),
                     (Advice("generation_backend", "check", "receives the weights after every update (the engine's "
                             "weight sync)"),
                      Advice("dtype", "check", "is the engine's dtype (a bf16 engine beside an fp32 trainer drifts)")))


def truncated_sampling(h: History) -> Optional[Diagnosis]:
    t = h.t
    gap = h.latest("generation/truncation_gap")
    if gap is None or gap.value <= t.truncation_gap_max:
        return None
    return Diagnosis("warning", "responses are sampled from a truncated distribution (top_k / top_p / min_new_tokens) "
                     "while PPO scores them under the policy's full one: each update is biased by that gap",
                     (dataclasses.replace(gap, bound=f"> {_fmt(t.truncation_gap_max)} nats per token; 0 without "
                                          "truncation"),),
                     (Advice("top_k", "set", "to 0 for training (truncate at evaluation instead)"),
                      Advice("top_p", "set", "to 1.0 for training"),
                      Advice("min_new_tokens", "lower", "if it is set (EOS held back is truncation too)")))


def runaway_length(h: History) -> Optional[Diagnosis]:
    t = h.t
    eos = h.compare("response/eos_rate", f"<= {_fmt(t.eos_fraction)} x start")
    if eos is None or eos.start < t.eos_start_min or eos.value > t.eos_fraction * eos.start:
        return None
    length = h.compare("response/length", "")
    penalty = h.setting("missing_eos_penalty")
    return Diagnosis("warning", "fewer responses end with EOS: the policy runs into max_new_tokens",
                     (eos, *([length] if length else [])),
                     (Advice("missing_eos_penalty", "set" if penalty is None else "raise",
                             "to ~1 (in score units)" if penalty is None else f"from {_fmt(penalty)}"),
                      _kl_advice(h), Advice("overlong_buffer", "set", "to ~max_new_tokens/4 (DAPO's soft penalty)")))


RULES: tuple[Rule, ...] = (
    Rule("reward_hacking", "The score rises (now vs the start, in start standard deviations) while at least one "
         "text-health measure degrades: distinct-2 falls, the within-response repeated 3-gram rate rises, the "
         "reference's perplexity on the responses rises (gibberish), or it collapses while responses grow "
         "longer (Secrets of RLHF Part I).",
         ("hacking_score_gain", "hacking_distinct_fraction", "hacking_repetition_rise", "hacking_perplexity_factor",
          "collapse_perplexity_fraction", "collapse_length_growth", "critical_after"), reward_hacking, escalates=True),
    Rule("reward_flat", "The score has not moved over the last `flat_updates` updates nor since the start, and either the steps are "
         "tiny (approx-KL: the learning rate is too low) or most of each step is clipped (the clip range is too "
         "small). A flat score with normal steps is not flagged: the reward may have nothing left to give; nor are the "
         "updates of critic warmup, where the policy is held still on purpose.",
         ("flat_updates", "flat_score_change", "flat_approx_kl", "flat_clipfrac"), reward_flat),
    Rule("unstable", "One update moves the policy too far from the one that sampled the batch: approx-KL, the "
         "clipped fraction, the mean ratio or the largest ratio past their bounds. Critical when approx-KL reaches a nat per token.",
         ("unstable_approx_kl", "unstable_clipfrac", "unstable_ratio", "unstable_ratio_max", "unstable_critical_approx_kl"),
         unstable),
    Rule("reward_model_exploited", "With a gold scorer (`gold_reward_fn`): the gold score falls from its best "
         "while the proxy does not, by more than its sampling noise (critical once gold is below its start), or the latest evaluation's KL is past "
         "the peak of R(d) = d(α − β log d) fitted to the evaluations' (√KL, gold gain) points (Gao et al. 2022).",
         ("exploit_gold_drop", "exploit_gold_noise_z", "gold_peak_margin", "critical_after"), reward_model_exploited,
         escalates=True),
    Rule("logprob_mismatch", "The first minibatch of an update sees exactly the rollout's policy, so its approx-KL "
         "is 0 and its ratio 1 (N-details item 15). Anything else means sampling and training compute log-probs "
         "differently (dropout on, another temperature, a train-mode layer): a bug in the setup. top_k / top_p "
         "are not a cause here: tether computes the old log-probs with its own forward under the full distribution "
         "(`truncated_sampling` reports the truncation).",
         ("mismatch_approx_kl", "mismatch_approx_kl_bf16", "mismatch_ratio"), logprob_mismatch),
    Rule("critic_not_learning", "With a critic (advantage_estimator=gae): its explained variance, averaged over the "
         "latest `critic_ev_updates` updates, is below `critic_ev_max` (slightly below 0): its values add variance "
         "to the advantages instead of removing it.", ("critic_ev_updates", "critic_ev_max"), critic_not_learning),
    Rule("entropy_collapse", "The policy's entropy on its own responses falls to a small fraction of the start's.",
         ("entropy_fraction",), entropy_collapse),
    Rule("grad_norm_spike", "The policy gradient norm (before clipping) jumps far above its recent median and past "
         "`max_grad_norm`.",
         ("grad_spike_factor", "grad_spike_history"), grad_norm_spike),
    Rule("engine_gap_growing", "With an external generation engine (generation_backend=vllm): the mean gap between "
         "its log-probs and the trainer's grows.", ("engine_gap_min", "engine_gap_growth"), engine_gap_growing),
    Rule("truncated_sampling", "With top_k, top_p or min_new_tokens set: the responses come from a truncated "
         "distribution q, PPO scores them under the policy's π, and the mean gap log q(a) − log π(a) over the "
         "sampled tokens (`generation/truncation_gap`) is large: the updates are off-policy by that much.",
         ("truncation_gap_max",), truncated_sampling),
    Rule("runaway_length", "The share of responses that end with EOS halves: responses run into max_new_tokens.",
         ("eos_start_min", "eos_fraction"), runaway_length),
)
RULE_NAMES = tuple(r.name for r in RULES)
# Found from what metrics.jsonl does not hold; `tether doctor` takes them from doctor.jsonl.
EXTRA_RULES = {
    "phrase_spreading": ("info", "One phrase spreads from few responses to most of them (the responses of every "
                         "update, compared with the first update's): often how a reward is being earned.",
                         ("phrase_share", "phrase_rise", "phrase_max_before")),
    "skipped_update": ("warning", "An update was skipped because a score, loss or gradient was not finite "
                       "(nothing non-finite reached the weights; `max_skipped_updates` in a row stop the run).", ()),
}
PHRASE_ADVICE = (Advice("reward_fn/reward_model", "check", "— whether it should pay for that phrase"), Advice("kl_coef", "raise", ""),
                 Advice("entropy_coef", "raise", ""), Advice("ptx_data", "set", "(PPO-ptx keeps the language general)"))


# --- the doctor ---------------------------------------------------------------------------


class Doctor:
    """Reads each logged row, and reports each finding once: the first time a rule fires at a
    severity it has not reached before (a warning that turns critical is reported again)."""

    def __init__(self, config: Optional[dict] = None):
        self.config = dict(config or {})
        self.thresholds = thresholds_from(self.config.get("doctor"))
        self.rows: list[dict] = []    # PPO updates (rows with reward/score)
        self.evals: list[dict] = []   # rows with held-out evaluation metrics
        self.reached: dict[str, str] = {}  # rule -> the highest severity reported
        self.streaks: dict[str, int] = {}  # rule -> updates in a row it has fired
        self.findings: list[Finding] = []
        self.first_shares: Optional[dict[str, float]] = None
        self.named_phrases: set[str] = set()

    def state_dict(self) -> dict:
        """Its memory (JSON-serialisable): a resumed run reports nothing twice and compares with the same start."""
        return {"rows": self.rows, "evals": self.evals, "reached": self.reached, "streaks": self.streaks,
                "findings": [f.to_dict() for f in self.findings], "first_shares": self.first_shares,
                "named_phrases": sorted(self.named_phrases)}

    def load_state_dict(self, state: dict) -> None:
        if "rows" not in state:  # a checkpoint written before the doctor kept its rows: start afresh
            return
        self.rows, self.evals = list(state["rows"]), list(state["evals"])
        self.reached, self.streaks = dict(state["reached"]), dict(state["streaks"])
        self.findings = [finding_from_dict(f) for f in state["findings"]]
        self.first_shares = state["first_shares"]
        self.named_phrases = set(state["named_phrases"])

    def observe(self, row: dict) -> list[Finding]:
        """One logged row (`update` plus metrics, as metrics.jsonl holds it); the new findings."""
        if any(key.startswith("eval/") for key in row):
            self.evals.append(row)
        if "reward/score" not in row:  # an evaluation alone (update 0) or a skipped update
            return []
        self.rows.append(row)
        history = History(self.rows, self.evals, self.config, self.thresholds)
        new = []
        for rule in RULES:
            diagnosis = rule.check(history)
            self.streaks[rule.name] = self.streaks.get(rule.name, 0) + 1 if diagnosis else 0
            if diagnosis is None:
                continue
            if rule.escalates and self.streaks[rule.name] >= self.thresholds.critical_after:
                diagnosis = dataclasses.replace(diagnosis, severity="critical", summary=diagnosis.summary +
                                                f", for {self.streaks[rule.name]} updates in a row")
            new += self._report(rule.name, row["update"], diagnosis)
        return new

    def observe_phrases(self, update: int, responses: list[str]) -> list[Finding]:
        """Names a phrase that has spread from few responses to most of them, once: a phrase that
        overlaps one already named ("united" after "the united states") is the same habit."""
        t = self.thresholds
        shares = phrase_shares(responses)
        if self.first_shares is None:
            self.first_shares = shares
            return []
        new = []
        for phrase, was, now in spreading_phrases(self.first_shares, shares, min_share=t.phrase_share,
                                                  min_rise=t.phrase_rise, max_before=t.phrase_max_before):
            if any(phrase_within(phrase, named) or phrase_within(named, phrase) for named in self.named_phrases):
                continue
            self.named_phrases.add(phrase)
            finding = Finding("phrase_spreading", "info", update,
                              f"\"{phrase}\" is in {now:.0%} of the responses ({was:.0%} at the first update): the "
                              "policy may be earning its reward with one phrase", (), PHRASE_ADVICE)
            self.findings.append(finding)
            new.append(finding)
        return new

    def skipped(self, update: int, reason: str) -> list[Finding]:
        finding = Finding("skipped_update", "warning", update, f"the update was skipped: {reason}")
        self.findings.append(finding)
        return [finding]

    def _report(self, rule: str, update: int, diagnosis: Diagnosis) -> list[Finding]:
        if rule in self.reached and severity_rank(diagnosis.severity) <= severity_rank(self.reached[rule]):
            return []
        self.reached[rule] = diagnosis.severity
        finding = Finding(rule, diagnosis.severity, update, diagnosis.summary, diagnosis.evidence, diagnosis.advice)
        self.findings.append(finding)
        return [finding]


def finding_from_dict(row: dict) -> Finding:
    """A Finding from its doctor.jsonl form (older runs wrote only `update` and `message`)."""
    if "rule" not in row:
        message = str(row.get("message", ""))
        rule = message.split(":")[1].strip() if message.count(":") >= 2 else "unknown"
        return Finding(rule, "warning", int(row.get("update", 0)), message)
    evidence = tuple(Evidence(**{**e, "updates": tuple(e["updates"]),
                                 **({"start_updates": tuple(e["start_updates"])} if "start_updates" in e else {})})
                     for e in row.get("evidence", []))
    advice = tuple(Advice(**a) for a in row.get("advice", []))
    return Finding(row["rule"], row["severity"], int(row["update"]), row["summary"], evidence, advice)


def replay(rows: Iterable[dict], config: Optional[dict] = None) -> list[Finding]:
    """Every finding the rules make from a run's logged rows, in order (what the live run found)."""
    doctor = Doctor(config)
    for row in rows:
        doctor.observe(row)
    return doctor.findings


def diagnose_run(run_dir, overrides: Optional[dict] = None) -> list[Finding]:
    """The findings of a finished or crashed run directory: the rules replayed over metrics.jsonl
    with its config.yaml's settings (thresholds overridden by `overrides`), plus the findings only
    the live run could make (spreading phrases, skipped updates) from doctor.jsonl."""
    import yaml

    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{run} has no metrics.jsonl: not a run directory (`tether ppo` writes one in its "
                         "output_dir)")
    config = {}
    if (run / "config.yaml").is_file():
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    config["doctor"] = {**(config.get("doctor") or {}), **(overrides or {})}
    thresholds_from(config["doctor"])  # a bad override fails before anything is read
    rows = _read_rows(metrics)
    if not any(_number(row.get("reward/score")) is not None for row in rows):
        # Nothing to judge is not a clean bill of health: a CI gate must not pass a run that logged nothing.
        raise ValueError(f"{metrics} holds no PPO update (no reward/score in {len(rows)} rows): the doctor reads "
                         "`tether ppo` runs; this run logged none (an SFT or reward-model run, or one that stopped "
                         "before its first update)")
    replayed = replay(rows, config)
    recorded = _read_rows(run / "doctor.jsonl") if (run / "doctor.jsonl").is_file() else []
    live_only = [finding_from_dict(r) for r in recorded if r.get("rule") not in RULE_NAMES]
    return sorted(replayed + live_only, key=lambda f: f.update)  # stable: at one update, the rules first


def _read_rows(path) -> list[dict]:
    """JSON lines; a last line cut short by a crash is left out."""
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise ValueError(f"{path}: line {number + 1} is not JSON; the file is damaged") from None
            continue
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number + 1} is not a JSON object; the file is damaged")
        rows.append(row)
    return rows


# --- docs/doctor.md --------------------------------------------------------------------------


def render_markdown() -> str:
    defaults = DoctorThresholds()
    fields = {f.name: f for f in dataclasses.fields(DoctorThresholds)}
    lines = ["# The training doctor", "",
             "Rendered from `tether/doctor.py` (`python -m tether.doctor > docs/doctor.md`).", "",
             "The doctor reads every row a PPO run logs. Each finding has a severity (info, warning, critical), the "
             "evidence (which metrics at which updates, with their values and the bound they crossed) and the "
             "settings to change. A finding is printed once, when it first fires (again only if it turns "
             "critical), written to `doctor.jsonl` and shown in `report.html`. `doctor_stop_on=critical` (or "
             "`warning`) stops the run at the first such finding, with a checkpoint and the report.", "",
             "`tether doctor RUN_DIR` reads a finished or crashed run directory and prints the findings: the rules "
             "replayed over its `metrics.jsonl` with the thresholds of its `config.yaml`, plus what only the live "
             "run could see (spreading phrases, skipped updates) from its `doctor.jsonl`. It exits with 1 when "
             "there is a warning or worse. `key=value` arguments override thresholds for the replay.", "",
             "'Start' is the mean of the first `window` updates, 'now' the mean of the last `window`.", "",
             "## Rules", ""]
    for rule in RULES:
        escalation = " Becomes critical after `critical_after` updates in a row." if rule.escalates else ""
        lines += [f"### `{rule.name}`", "", rule.watches + escalation, "",
                  "Thresholds: " + ", ".join(f"`{n}` = {getattr(defaults, n)}" for n in rule.thresholds), ""]
    for name, (severity, watches, names) in EXTRA_RULES.items():
        used = ("Thresholds: " + ", ".join(f"`{n}` = {getattr(defaults, n)}" for n in names)) if names else ""
        lines += [f"### `{name}` ({severity})", "", watches, "", *([used, ""] if used else [])]
    lines += ["## Thresholds", "", "Set any of them with `doctor`, e.g. `tether ppo ... 'doctor={flat_updates: 30}'` "
              "or in YAML `doctor: {flat_updates: 30}`.", "", "| threshold | default | meaning |", "| --- | ---: | --- |"]
    for name in THRESHOLD_NAMES:
        lines.append(f"| `{name}` | {getattr(defaults, name)} | {fields[name].metadata['help']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
