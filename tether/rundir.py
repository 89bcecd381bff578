"""Run directories: one run per directory, locked while in use, never overwritten by accident,
and resumable from their latest complete checkpoint.

A stage (sft, reward, ppo) starts in two steps:

  open_run    before anything loads: refuse a directory that holds another run (unless
              `resume=true` or `overwrite=true`), refuse a changed config on resume (listing
              the keys), take the lock (`.tether.lock`: pid, host, start time)
  commit      after every check that can fail has passed: `overwrite` clears the old run,
              a new run writes config.yaml, a resumed one truncates its logs to the checkpoint

so a run that fails on a typo leaves the previous run's files exactly as they were.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tether.precision import LEGACY_DTYPES

log = logging.getLogger(__name__)

LOCK_FILE = ".tether.lock"
RUN_MARKER = ".tether-run"  # written as a run starts: the run files beside it are tether's to replace
CONFIG_FILE = "config.yaml"
STATE_FILE = "trainer_state.json"
LOG_FILES = ("metrics.jsonl", "samples.jsonl", "doctor.jsonl")
RUN_FILES = (CONFIG_FILE, *LOG_FILES, "summary.json", "report.html")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# Keys a resumed run may change: they decide how long it runs, how it logs and where it prints,
# not what a step computes. (total_updates / max_steps with a decaying lr_schedule: the
# remaining steps follow the new length.)
SAFE_TO_CHANGE = frozenset({
    "resume", "overwrite", "total_updates", "max_steps", "max_seconds", "progress", "save_every",
    "keep_checkpoints", "eval_every", "sample_every", "num_samples", "log_with", "wandb_project", "num_threads",
    "doctor", "doctor_stop_on",
    # where the run lives (a run directory moved or copied resumes from its new place), and whether a
    # skipped update is undone (it changes nothing while updates are not skipped)
    "output_dir", "undo_skipped_updates", "reward_timeout_s",
    # how a reward server is reached: a run stopped by a server that went away resumes against it restarted
    "reward_url", "reward_url_timeout_s", "reward_url_retries", "reward_url_batch_size", "reward_url_concurrency",
})


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message says what to pass instead."""


@dataclass
class RunStart:
    """What `open_run` found: where the run lives, and the checkpoint to resume from (or None)."""

    path: Path
    checkpoint: Optional[Path]
    lock: "RunLock"
    overwrite: bool = False


# --- what a directory holds ----------------------------------------------------------------


def checkpoints(path: Path) -> list[tuple[int, Path]]:
    """Complete `checkpoint-N` directories, oldest first. A checkpoint is written to `.tmp` and
    renamed, so a directory of that name is complete; one without its state file is not ours."""
    found = []
    for child in Path(path).iterdir() if Path(path).is_dir() else []:
        match = CHECKPOINT.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(path: Path) -> Optional[Path]:
    """The checkpoint with the most steps: `final/` when the run finished, else the last `checkpoint-N`."""
    candidates = checkpoints(path)
    final = Path(path) / "final"
    if (final / STATE_FILE).is_file():
        candidates.append((checkpoint_step(final), final))
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def damaged_checkpoint_error(run: Path, checkpoint: Path, what: str) -> RunDirError:
    """A checkpoint that cannot be resumed from: name it, what is wrong, and the way on."""
    step = checkpoint_step(checkpoint) if (checkpoint / STATE_FILE).is_file() else None
    earlier = [p for n, p in checkpoints(run) if p != checkpoint and (step is None or n <= step)]
    way_on = (f"resume again to continue from {earlier[-1].name}" if earlier
              else "no earlier checkpoint is left: start over with overwrite=true")
    return RunDirError(f"cannot resume from {checkpoint}: {what}. Nothing was changed; move it aside (mv {checkpoint} "
                       f"{checkpoint}.damaged) and {way_on}")


def check_final_complete(run: Path) -> None:
    """A PPO run's final/ always holds its trainer state: one without is damaged, and resuming from
    an older checkpoint would silently replace the newer rows."""
    final = Path(run) / "final"
    if final.is_dir() and not (final / STATE_FILE).is_file():
        raise damaged_checkpoint_error(Path(run), final, f"it has no {STATE_FILE} (a finished PPO run writes one)")


def checkpoint_step(checkpoint: Path) -> int:
    state = json.loads((Path(checkpoint) / STATE_FILE).read_text())
    return int(state.get("update", state.get("step", 0)))


def run_contents(path: Path) -> list[str]:
    """Names of the run files and checkpoints in `path` (empty: no run there)."""
    path = Path(path)
    if not path.is_dir():
        return []
    names = [name for name in RUN_FILES if (path / name).exists()]
    names += [p.name for _, p in checkpoints(path)]
    names += ["final"] if (path / "final").is_dir() else []
    return names


def written_by_tether(path: Path) -> bool:
    """A directory whose run files tether wrote: it holds the marker, or (runs from before the marker)
    a checkpoint's trainer state or a metrics log."""
    path = Path(path)
    if (path / RUN_MARKER).is_file() or (path / "metrics.jsonl").is_file():
        return True
    return any((p / STATE_FILE).is_file() for p in [*path.glob("checkpoint-*"), path / "final"])


def prune_checkpoints(path: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoint-N directories (0 keeps all)."""
    if keep <= 0:
        return
    for _, old in checkpoints(path)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# --- the config of a resumed run -------------------------------------------------------------


def changed_keys(saved: dict[str, Any], current: dict[str, Any], defaults: Optional[dict[str, Any]] = None) -> list[str]:
    """`key: old -> new` for every setting that differs, except those safe to change on resume. A key
    the saved config lacks (a setting added since the run was written) is no change while it is at
    its default: the default is how the run was trained."""
    keys = sorted((set(saved) | set(current)) - SAFE_TO_CHANGE)
    added_at_default = {k for k in keys if k not in saved and defaults is not None and k in defaults
                        and current.get(k) == defaults[k]}
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k) and k not in added_at_default]


def with_precision(saved: dict[str, Any]) -> dict[str, Any]:
    """A config written before `precision` replaced `dtype`, as it would be written now."""
    if "precision" in saved or "dtype" not in saved:
        return saved
    return {**saved, "precision": LEGACY_DTYPES.get(saved["dtype"], saved["dtype"]), "dtype": None}


def check_resumable_config(path: Path, current: dict[str, Any], defaults: Optional[dict[str, Any]] = None) -> None:
    import yaml

    saved_file = Path(path) / CONFIG_FILE
    if not saved_file.is_file():
        raise RunDirError(f"cannot resume {path}: it has no {CONFIG_FILE}, so nothing says how it was run; "
                          "start a new run (resume=false) in an empty output_dir")
    saved = with_precision(yaml.safe_load(saved_file.read_text()) or {})
    changes = changed_keys(saved, current, defaults)
    if changes:
        raise RunDirError(
            f"cannot resume {path} with a different config; changed: {'; '.join(changes)}. Resume with the run's "
            f"own settings (its {CONFIG_FILE}), or start a new run in another output_dir. Safe to change on resume: "
            + ", ".join(sorted(SAFE_TO_CHANGE - {"resume", "overwrite"})))


# --- the lock --------------------------------------------------------------------------------


class RunLock:
    """`.tether.lock` in the run directory, created exclusively: one run at a time per directory.

    A lock left by a dead process on this host is stale and taken over; one left by this very
    process (an earlier run in the same interpreter that raised) too. A lock from another host
    cannot be checked: the message says to delete it once that run is known to be gone.
    """

    def __init__(self, path: Path):
        self.file = Path(path) / LOCK_FILE
        self.held = False

    def acquire(self) -> "RunLock":
        self.file.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _attempt in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_holder(me)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)
            return self
        raise RunDirError(f"cannot take the lock {self.file}; delete it if no run is using {self.file.parent}")

    def _check_holder(self, me: dict) -> None:
        """Remove a stale lock, or refuse with who holds it."""
        try:
            holder = json.loads(self.file.read_text())
        except (OSError, ValueError):
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        if host == me["host"] and isinstance(pid, int) and (pid == me["pid"] or not _alive(pid)):
            log.warning("removing a stale lock %s (pid %s is no longer running)", self.file, pid)
            self.file.unlink(missing_ok=True)
            return
        if not holder:  # unreadable: a lock being written this instant, or garbage
            raise RunDirError(f"{self.file} exists but cannot be read; if no run is using {self.file.parent}, "
                              "delete it and start again")
        raise RunDirError(f"another tether run (pid {pid} on {host}, started {holder.get('started')}) is using "
                          f"{self.file.parent}; wait for it to finish or stop it, or choose another output_dir"
                          + ("" if host == me["host"] else f"; if it is known to be gone, delete {self.file}"))

    def release(self) -> None:
        if self.held:
            self.file.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# --- starting a run ----------------------------------------------------------------------------


def open_run(path: str | Path, current_config: dict[str, Any], resume: bool = False,
             overwrite: bool = False, defaults: Optional[dict[str, Any]] = None) -> RunStart:
    """Check the directory against what is asked, take the lock; writes nothing else. `defaults`:
    the stage's default config, for settings added since a resumed run was written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output_dir {path} is a file; choose a directory")
    if resume and overwrite:
        raise RunDirError("resume=true and overwrite=true contradict each other: resume continues the run in "
                          f"{path}, overwrite replaces it; choose one")
    contents = run_contents(path)
    checkpoint = None
    if resume:
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise RunDirError(f"nothing to resume in {path}: no complete checkpoint there "
                              f"({', '.join(contents) or 'empty'}); start it without resume=true "
                              "(set save_every to write checkpoints)")
        check_resumable_config(path, current_config, defaults)
    elif contents and not written_by_tether(path):
        raise RunDirError(f"output_dir {path} holds {', '.join(contents[:6])}, which tether did not write (no "
                          f"{RUN_MARKER} there), and tether never replaces files it did not write: choose another "
                          "output_dir, or move those files away")
    elif contents and not overwrite:
        raise RunDirError(f"output_dir {path} already holds a run ({', '.join(contents[:6])}"
                          f"{', ...' if len(contents) > 6 else ''}); pass resume=true to continue it, "
                          "overwrite=true to replace it, or choose another output_dir")
    lock = RunLock(path).acquire()
    return RunStart(path, checkpoint, lock, overwrite=bool(overwrite and contents))


def commit_run(start: RunStart, save_config, resumed_step: Optional[int] = None) -> None:
    """Every check has passed: clear an overwritten run, write config.yaml, truncate resumed logs."""
    if start.overwrite:
        clear_run(start.path)
    (start.path / RUN_MARKER).write_text("tether run directory: its run files are replaced by overwrite=true\n")
    if resumed_step is not None:
        for name in LOG_FILES:
            truncate_jsonl(start.path / name, resumed_step)
    save_config(start.path / CONFIG_FILE)  # on resume: the same but for keys safe to change


def clear_run(path: Path) -> None:
    """The files of a run (`overwrite=true`); anything else in the directory is left alone."""
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    for name in ("final", "plots", *[p.name for p in path.glob("checkpoint-*")]):
        if (path / name).is_dir():
            shutil.rmtree(path / name)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the rows of steps <= `step` (and drop a torn last line), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if row.get("update", row.get("step", 0)) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
