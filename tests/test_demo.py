"""The demo pipeline end to end at CI size: every stage runs, is cached, and the report is complete."""

import json
import re
from html.parser import HTMLParser

import pytest

from tether.pipelines.demo import (DemoSettings, _clear, _empty, margin_pairs, most_spread_phrase, run_demo,
                                   vader_compound)
from tether.report import PLOT_NAMES


def test_vader_scores_only_the_given_text():
    scores = vader_compound(["what a wonderful, lovely day", "a horrible, awful mess", "the table"])
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0


def test_margin_pairs_keep_only_clear_preferences():
    pairs = margin_pairs("p", ["a", "b", "c", "a "], [0.9, 0.2, 0.85, 0.1], margin=0.5)
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {("a", "b"), ("c", "b"), ("c", "a ")}
    assert all(p["gold_chosen"] - p["gold_rejected"] >= 0.5 for p in pairs)


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if key in attrs:
                self.links.append(attrs[key])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo")
    summary = run_demo(run, settings=DemoSettings.small())
    return run, summary


def test_demo_runs_every_stage_and_writes_a_complete_report(demo_run):
    run, summary = demo_run
    for stage in ("sft/final/config.json", "reward/final/config.json", "preferences.jsonl", "ppo/final/config.json"):
        assert (run / stage).is_file(), stage
    assert summary["SFT held-out perplexity"] > 1
    assert 0.0 <= summary["reward model held-out accuracy"] <= 1.0
    assert -1 <= summary["gold (VADER) before PPO"] <= 1
    html = (run / "ppo" / "report.html").read_text()
    parser = Collector()
    parser.feed(html)
    assert len(parser.images) == len(PLOT_NAMES)
    assert all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert not [link for link in parser.links if re.match(r"(https?:)?//", link)]
    for name in PLOT_NAMES:
        assert (run / "ppo" / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reward model held-out accuracy" in html and "SFT held-out perplexity" in html
    evals = [json.loads(line) for line in (run / "ppo" / "samples.jsonl").read_text().splitlines()]
    updates = sorted({s["update"] for s in evals if s["split"] == "eval"})
    assert updates[0] == 0 and updates[-1] == 3
    assert all("gold" in s for s in evals)
    assert "phrase that spread most (held-out responses)" in html


def test_most_spread_phrase_reports_what_the_policy_learned_to_say():
    before = ["the cat sat.", "a dog ran.", "he went home.", "the United States said no."]
    after = ["the cat sat in the United States.", "the United States ran.", "he went home.", "the United States."]
    assert most_spread_phrase(before, after) == '"the united states" in 25% -> 75% of responses'
    assert most_spread_phrase(before, before).startswith("none")


def test_second_run_reuses_cached_stages_and_fresh_recomputes(demo_run):
    run, _ = demo_run
    sft_weights = run / "sft" / "final" / "model.safetensors"
    stamp = sft_weights.stat().st_mtime_ns
    pairs = (run / "preferences.jsonl").read_text()
    again = run_demo(run, settings=DemoSettings.small())
    assert sft_weights.stat().st_mtime_ns == stamp
    assert (run / "preferences.jsonl").read_text() == pairs
    assert again["time sft (s)"] < 5 and again["time reward (s)"] < 5
    run_demo(run, fresh=True, settings=DemoSettings.small())
    assert sft_weights.stat().st_mtime_ns != stamp


def test_a_changed_setting_recomputes_its_stage_and_every_later_one(demo_run, capsys):
    run, _ = demo_run
    sft_weights, rm_weights = run / "sft" / "final" / "model.safetensors", run / "reward" / "final" / "model.safetensors"
    sft_stamp, rm_stamp = sft_weights.stat().st_mtime_ns, rm_weights.stat().st_mtime_ns
    marker = (run / "preferences.done").read_text()
    settings = DemoSettings.small()
    settings.pref_margin = 0.2  # small() uses 0.05
    capsys.readouterr()
    run_demo(run, settings=settings)
    assert "preference pairs: the cached copy came from other settings" in capsys.readouterr().out
    assert sft_weights.stat().st_mtime_ns == sft_stamp  # SFT's own settings did not change
    assert (run / "preferences.done").read_text() != marker
    assert rm_weights.stat().st_mtime_ns != rm_stamp  # trained on the new pairs
    pairs = [json.loads(line) for line in (run / "preferences.jsonl").read_text().splitlines()]
    assert pairs and all(p["gold_chosen"] - p["gold_rejected"] >= 0.2 for p in pairs)


def test_a_marker_without_recorded_inputs_is_not_trusted(demo_run, capsys):
    run, _ = demo_run
    rm_weights = run / "reward" / "final" / "model.safetensors"
    stamp, marker = rm_weights.stat().st_mtime_ns, (run / "preferences.done").read_text()
    (run / "reward" / ".done").write_text("")  # what an older tether wrote
    settings = DemoSettings.small()
    settings.pref_margin = 0.2  # as the previous test left the cache
    capsys.readouterr()
    run_demo(run, settings=settings)
    assert "reward model: the cached copy came from other settings" in capsys.readouterr().out
    assert rm_weights.stat().st_mtime_ns != stamp
    assert (run / "preferences.done").read_text() == marker  # earlier stages stay cached


def test_clearing_a_linked_stage_directory_keeps_what_it_points_to(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_text("weights")
    link = tmp_path / "run" / "sft"
    link.parent.mkdir()
    link.symlink_to(elsewhere)
    _clear(link)
    assert not link.exists() and (elsewhere / "model.safetensors").read_text() == "weights"


def test_fresh_empties_a_linked_run_directory_and_keeps_the_link(tmp_path):
    target, shared = tmp_path / "disk" / "demo", tmp_path / "shared_weights"
    (target / "sft").mkdir(parents=True)
    (target / "summary.json").write_text("{}")
    shared.mkdir()
    (shared / "model.safetensors").write_text("weights")
    (target / "reward").symlink_to(shared)
    run = tmp_path / "runs_demo"
    run.symlink_to(target)
    _empty(run)
    assert run.is_symlink() and target.is_dir() and not list(target.iterdir())
    assert (shared / "model.safetensors").read_text() == "weights"
    _empty(tmp_path / "missing")  # nothing to clear is not an error
