"""Step 5 of a PPO update, and what decides whether the run goes on: the record of each update
(doctor, samples), the doctor's findings (said to the log and to doctor.jsonl), skipped
updates, stop signals, the guard that keeps non-finite values from the weights, and the undo of a
skipped update's optimizer steps.

It decides; the trainer saves (tether/trainers/ppo/state.py) and raises `TrainingStopped`."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from tether import distributed
from tether.config import PPOConfig
from tether.doctor import Doctor, Finding, severity_rank
from tether.report import build_report
from tether.rollout import Rollout
from tether.sharding import local_shard
from tether.tracking import SampleWriter
from tether.trainers import check_finite

log = logging.getLogger(__package__)

STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # exit codes as a shell reports them
LOG_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}  # doctor findings


class TrainingStopped(RuntimeError):
    """The run stopped before its last update; `checkpoint` holds everything needed to resume it."""

    def __init__(self, message: str, checkpoint: Optional[Path] = None, exit_code: int = 1,
                 reason: Optional[str] = None):
        super().__init__(message)
        self.checkpoint, self.exit_code = checkpoint, exit_code
        self.reason = reason or message  # why it stopped, without where it is and how to resume


@contextmanager
def stop_requests(on_signal: Callable[[int], None]):
    """While inside, SIGINT/SIGTERM call `on_signal` once (the run stops after the current update);
    a second one interrupts at once. Outside the main thread signals cannot be caught: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def handler(sig, _frame):
        for s in STOP_SIGNALS:  # the second signal gets Python's default: KeyboardInterrupt / exit
            signal.signal(s, previous[s] if s != signal.SIGINT else signal.default_int_handler)
        on_signal(sig)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class Stop:
    """Why the run stops after this update, and how."""

    reason: str
    exit_code: int = 1
    report: bool = False  # write report.html beside the checkpoint (a doctor stop)

    def error(self, checkpoint: Optional[Path], run_dir: Optional[Path], writes: bool) -> TrainingStopped:
        """The one message saying why the run stopped, where it is and how to go on."""
        where = (f"; checkpoint {checkpoint}; continue with the same command plus resume=true"
                 if checkpoint is not None else "; no run directory, nothing saved")
        if self.report and checkpoint is not None and writes:
            where += f"; report {_write_report(run_dir)}"
        return TrainingStopped(self.reason + where, checkpoint, self.exit_code, reason=self.reason)


def _write_report(run_dir: Path) -> str:
    """report.html of the run so far; a failure to draw it never hides why the run stopped."""
    try:
        return str(build_report(run_dir))
    except Exception as err:  # noqa: BLE001 - the stop's own message matters more
        return f"not written ({type(err).__name__}: {err}; `tether report {run_dir}` retries)"


class RunControl:
    """What one run records and decides beside the loop: the doctor's findings, samples.jsonl,
    skipped updates, stop requests. Every rank keeps its own; the decisions are taken together
    (`stop_after`)."""

    def __init__(self, cfg: PPOConfig, doctor: Doctor, samples: Optional[SampleWriter], run_dir: Optional[Path],
                 writes: bool):
        self.cfg, self.doctor, self.samples, self.run_dir, self.writes = cfg, doctor, samples, run_dir, writes
        self.skipped_updates = 0    # over the run: updates whose score, loss or gradient was not finite
        self.skipped_in_a_row = 0
        self.first_skip_reason: Optional[str] = None
        self.stop_signal: Optional[int] = None
        self.doctor_stop: Optional[str] = None  # the finding that stops the run (doctor_stop_on)

    def record(self, update: int, metrics: dict[str, float], rollout: Rollout, scores: Tensor,
               gold: Optional[Tensor]) -> None:
        """An update's metrics and its responses' phrases to the doctor; when due, its samples
        (`scores` as logged, `gold` scores where there is a gold reward)."""
        cfg = self.cfg
        responses = distributed.gather_lists(rollout.responses)
        self.say(self.doctor.observe({"update": update, **metrics}) + self.doctor.observe_phrases(update, responses))
        due = update == 1 or update == cfg.total_updates or (cfg.sample_every and update % cfg.sample_every == 0)
        if self.samples is not None and due and cfg.num_samples:
            # One response per prompt group (the first of its samples_per_prompt), so they are different prompts.
            rows = list(range(0, len(rollout), cfg.samples_per_prompt))[: cfg.num_samples]
            extra = {"gold": [gold[i].item() for i in rows]} if gold is not None else {}
            self.samples.write(update, [rollout.prompts[i] for i in rows], [rollout.responses[i] for i in rows],
                               [scores[i].item() for i in rows], split=["train"] * len(rows), **extra)

    def say(self, findings: list[Finding]) -> None:
        """The doctor's new findings go to the log (once each) and to doctor.jsonl, which the report
        and `tether doctor` show; one at doctor_stop_on's severity or worse stops the run."""
        stop_on = self.cfg.doctor_stop_on
        for finding in findings:
            if self.writes:
                log.log(LOG_LEVELS[finding.severity], "doctor: %s", finding.message)
                if self.run_dir is not None:
                    with (self.run_dir / "doctor.jsonl").open("a") as f:
                        f.write(json.dumps(finding.to_dict()) + "\n")
            if stop_on != "never" and severity_rank(finding.severity) >= severity_rank(stop_on):
                self.doctor_stop = self.doctor_stop or f"{finding.rule} ({finding.severity}) at update {finding.update}"

    def request_stop(self, sig: int, update: int) -> None:
        """A stop signal during `update` (numbered from 1): the run stops after it."""
        self.stop_signal = sig
        log.warning("%s: stopping after update %d (a second one stops at once, without a checkpoint)",
                    signal.Signals(sig).name, update)

    def skipped(self, update: int, reason: str) -> dict[str, float]:
        """Count a skipped update and say why (no non-finite value reached the weights); its metrics."""
        self.skipped_updates += 1
        self.skipped_in_a_row += 1
        self.first_skip_reason = self.first_skip_reason if self.skipped_in_a_row > 1 else reason
        self.say(self.doctor.skipped(update, reason))
        return {"ppo/skipped_updates": float(self.skipped_updates)}

    def trained(self) -> None:
        self.skipped_in_a_row = 0

    def stop_after(self, update: int) -> Optional[Stop]:
        """Whether the run stops after `update`, the same answer on every rank: too many skipped updates
        in a row, a doctor finding at doctor_stop_on (rank 0's evaluation may be what fired), a signal."""
        if self.skipped_in_a_row >= self.cfg.max_skipped_updates:
            return Stop(f"{self.skipped_in_a_row} updates in a row were skipped; the first because "
                        f"{self.first_skip_reason}")
        if distributed.any_rank(self.doctor_stop is not None):
            return Stop(f"the doctor stopped the run (doctor_stop_on={self.cfg.doctor_stop_on}): "
                        f"{self.doctor_stop or 'a finding on rank 0'}", report=True)
        if distributed.any_rank(self.stop_signal is not None):  # every rank stops at the same update
            sig = self.stop_signal or signal.SIGTERM
            return Stop(f"stopped by {signal.Signals(sig).name} after update {update}", STOP_SIGNALS[sig])
        return None

    def state_dict(self) -> list:
        return [self.skipped_updates, self.skipped_in_a_row, self.first_skip_reason]

    def load_state_dict(self, state: list) -> None:
        self.skipped_updates, self.skipped_in_a_row, self.first_skip_reason = state


# --- the non-finite guard ------------------------------------------------------------------


def _first_non_finite(**tensors: Tensor) -> Optional[tuple[str, int, float]]:
    """(name, batch row, value) of the first NaN/inf in the first tensor holding one, else None."""
    for name, tensor in tensors.items():
        bad = ~torch.isfinite(tensor.float())
        if bad.any():
            first = bad.flatten().nonzero()[0, 0]
            return name, int(bad.nonzero()[0, 0]), tensor.flatten()[first].item()
    return None


def non_finite_reason(rollout: Rollout) -> Optional[str]:
    """Why this rank's rollout must not reach the score statistics or the weights, or None."""
    bad = _first_non_finite(score=rollout.scores, **{"policy log-prob": rollout.logprobs,
                            "reference log-prob": rollout.ref_logprobs, "value": rollout.values})
    if not bad:
        return None
    name, row, value = bad
    return (f"the rollout had a non-finite {name} ({value}) for response {row} {rollout.responses[row][:100]!r}: "
            + ("check the reward model or function for that input" if name == "score" else
               "lower learning_rate (or check the models for inf/NaN weights)"))


NONFINITE_FAULT_ENV = "TETHER_FAULT_NONFINITE_STEP"
_policy_steps = [0]


def injected_fault(name: str) -> bool:
    """Fault injection for benchmarks/chaos.py: with TETHER_FAULT_NONFINITE_STEP=N the N-th policy
    step of the process sees a non-finite gradient norm (as a real one would). Unset: never."""
    target = os.environ.get(NONFINITE_FAULT_ENV)
    if not target or name != "policy":
        return False
    _policy_steps[0] += 1
    return _policy_steps[0] == int(target)


def check_finite_losses(losses: list[tuple[str, Tensor]], update: int) -> None:
    """Raises on every rank when a loss is not finite on any; the update's handler drops the gradients."""
    check_finite(losses, f"non-finite {{what}} ({{value}}) at update {update}; nothing was applied to the "
                         "weights. Lower learning_rate, or check the reward for extreme values.")


class UpdateUndo:
    """A CPU copy of everything an update's optimizer steps change — trainable weights, AdamW
    moments and step counts, learning rates, schedulers — so that a skipped update leaves them
    exactly as they were before it (an update of several steps may fail after its first).
    Sharded weights (FSDP2) are copied shard by shard, each rank its own."""

    def __init__(self, optimizers: list[tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]):
        self.optimizers = optimizers
        with torch.no_grad():
            self.saved = [self._save(optimizer, scheduler) for optimizer, scheduler in optimizers]

    @staticmethod
    def _save(optimizer, scheduler) -> dict:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {"weights": [local_shard(p).to("cpu", copy=True) for p in params],
                "state": [{k: local_shard(v).to("cpu", copy=True) if torch.is_tensor(v) else v
                           for k, v in optimizer.state[p].items()} if p in optimizer.state else None for p in params],
                "lrs": [group["lr"] for group in optimizer.param_groups],
                "scheduler": scheduler.state_dict()}

    def restore(self) -> None:
        with torch.no_grad():
            for (optimizer, scheduler), saved in zip(self.optimizers, self.saved):
                params = [p for group in optimizer.param_groups for p in group["params"]]
                for p, weight, state in zip(params, saved["weights"], saved["state"]):
                    local_shard(p).copy_(weight)
                    if state is None:
                        optimizer.state.pop(p, None)  # no step had been taken on it before this update
                    else:
                        for key, value in state.items():
                            current = optimizer.state[p][key]
                            if torch.is_tensor(current):
                                local_shard(current).copy_(value)
                            else:
                                optimizer.state[p][key] = value
                for group, lr in zip(optimizer.param_groups, saved["lrs"]):
                    group["lr"] = lr
                scheduler.load_state_dict(saved["scheduler"])


def abandon_update(optimizers: list[tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]],
                   before: Optional[UpdateUndo]) -> None:
    """After a non-finite step: nothing accumulated so far may leak into the next step, and with
    `before` (undo_skipped_updates) the update's earlier steps are undone too: weights as before it."""
    for optimizer, _ in optimizers:
        optimizer.zero_grad(set_to_none=True)
    if before is not None:
        before.restore()
