"""Metric sinks: TensorBoard and W&B receive exactly what metrics.jsonl holds (stand-in modules,
so the suite needs neither package), and a missing package fails before any model loads."""

import json
import sys
import types

import pytest

from conftest import base_overrides
from tether.config import PPOConfig, config_from_dict
from tether.pipelines.ppo import run_ppo


class FakeSummaryWriter:
    instances: list["FakeSummaryWriter"] = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def close(self):
        self.closed = True


class FakeWandbRun:
    def __init__(self, **kwargs):
        self.init_kwargs, self.rows, self.finished = kwargs, [], False

    def log(self, metrics, step):
        self.rows.append((dict(metrics), step))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_sinks(monkeypatch):
    FakeSummaryWriter.instances.clear()
    runs = []
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = FakeSummaryWriter
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: runs.append(FakeWandbRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    return runs


def test_tensorboard_and_wandb_get_every_metric_row_at_its_update(tiny_dirs, tmp_path, fake_sinks):
    cfg = config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, log_with=["tensorboard", "wandb"],
                                                     wandb_project="tether-test"))
    run_ppo(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2]

    (writer,) = FakeSummaryWriter.instances
    assert writer.log_dir == str(tmp_path / "run" / "tensorboard") and writer.closed
    expected = {(key, value, row["update"]) for row in rows for key, value in row.items() if key != "update"}
    assert set(writer.scalars) == expected and len(writer.scalars) == len(expected)

    (run,) = fake_sinks
    assert run.init_kwargs["project"] == "tether-test" and run.init_kwargs["dir"] == str(tmp_path / "run")
    assert run.init_kwargs["config"]["total_updates"] == 2  # the resolved config goes along
    assert [step for _, step in run.rows] == [1, 2] and run.finished
    for (metrics, _), row in zip(run.rows, rows):
        assert metrics == {k: v for k, v in row.items() if k != "update"}


@pytest.mark.parametrize("sink", ["tensorboard", "wandb"])
def test_missing_sink_package_fails_before_models_load_and_names_the_install(tiny_dirs, tmp_path, monkeypatch, sink):
    monkeypatch.setitem(sys.modules, sink, None)  # None in sys.modules: import fails as if not installed
    cfg = config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, log_with=[sink]))
    with pytest.raises(ImportError, match=f"pip install {sink}"):
        run_ppo(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran
