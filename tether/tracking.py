"""Metric sinks: JSONL always; TensorBoard and Weights & Biases when asked (imported lazily)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any, Protocol


class MetricSink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line, flushed at once so a crash never loses a logged update."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"update": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible
    return value


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(_missing_package("tensorboard")) from err
        self._writer = SummaryWriter(str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    def __init__(self, project: str, config: dict, run_dir: Path):
        try:
            import wandb
        except ImportError as err:
            raise ImportError(_missing_package("wandb")) from err
        self._run = wandb.init(project=project, config=config, dir=str(run_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class Tracker:
    """Fans one metrics dict out to every sink."""

    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def check_sink_packages(log_with: list[str]) -> None:
    """Fail before any model is loaded when a requested sink's package (named like the sink) is missing."""
    for sink in log_with:
        if not _installed(sink):
            raise ImportError(_missing_package(sink))


def _missing_package(sink: str) -> str:
    return (f"log_with={sink} needs `pip install {sink}` (or `pip install tether[{sink}]`); "
            f"or drop {sink!r} from log_with — metrics.jsonl is always written")


def _installed(package: str) -> bool:
    if package in sys.modules:  # imported already (None marks a failed import)
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def make_tracker(run_dir: Path, log_with: list[str], project: str = "tether", config: dict | None = None) -> Tracker:
    sinks: list[MetricSink] = [JsonlSink(Path(run_dir) / "metrics.jsonl")]
    if "tensorboard" in log_with:
        sinks.append(TensorBoardSink(Path(run_dir) / "tensorboard"))
    if "wandb" in log_with:
        sinks.append(WandbSink(project, config or {}, Path(run_dir)))
    return Tracker(sinks)


class SampleWriter:
    """samples.jsonl: prompt, response and score of a few rollouts at chosen updates."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, update: int, prompts: list[str], responses: list[str], scores: list[float], **extra: list) -> None:
        with self.path.open("a") as f:
            for i, (p, r, s) in enumerate(zip(prompts, responses, scores)):
                row = {"update": update, "prompt": p, "response": r, "score": s}
                row.update({k: v[i] for k, v in extra.items()})
                f.write(json.dumps(row) + "\n")
