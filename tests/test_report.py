"""`tether report`: a self-contained HTML page and PNG plots from a run directory (synthetic runs, no models)."""

import base64
import html
import json
import math
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest

from tether.cli import main as cli_main
from tether.report import PLOT_NAMES, build_report, fit_gao_rl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALPHA, BETA, GOLD0 = 1.2, 0.5, -0.3  # gold = GOLD0 + d(α − β log d), Gao et al. 2022's RL form
EVAL_UPDATES = (1, 2, 3, 4, 10, 20)  # middle of 1..20 is 10.5 → update 10 (not the list's median, 3 or 4)
PROMPTS = ("q0", "q1", "q2")
SCRIPT = "<script>alert('x')</script>"


def gao_gold(kl: float) -> float:
    d = math.sqrt(kl)
    return GOLD0 + (d * (ALPHA - BETA * math.log(d)) if d > 0 else 0.0)


def metrics_row(u: int, gold: bool) -> dict:
    kl = 0.25 * (u - 1)
    row = {"update": u, "reward/score": 0.1 * u, "kl/mean": kl, "kl/coef": 0.05, "policy/entropy": 2.0 - 0.05 * u,
           "response/length": 10.0 + u, "policy/clipfrac": 0.05, "value/loss": "nan"}
    if gold:
        row["gold/score"] = gao_gold(kl)
        if u in EVAL_UPDATES:
            row.update({"eval/score": 0.1 * u, "eval/kl": kl, "eval/gold": gao_gold(kl)})
    return row


def write_run(root, gold=True, eval_samples=True, train_prompts_vary=False):
    """A 20-update run with an eval prompt set sampled at EVAL_UPDATES and a few train samples."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [metrics_row(u, gold) for u in range(1, 21)]
    rows[4]["reward/score"] = "inf"  # JsonlSink writes non-finite values as strings
    rows[5]["policy/clipfrac"] = "nan"
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = []
    for u in EVAL_UPDATES if eval_samples else ():
        for i, prompt in enumerate(PROMPTS):
            response = SCRIPT if (u, prompt) == (20, "q1") else f"r{i}@{u}"
            samples.append({"update": u, "prompt": prompt, "response": response, "score": 0.1 * u,
                            "gold": gao_gold(0.25 * (u - 1)), "split": "eval"})
    for u in (1, 10, 20):  # train rows: no "split" key means train
        prompt = f"train prompt {u}" if train_prompts_vary else "train prompt"
        samples.append({"update": u, "prompt": prompt, "response": f"train response {u}", "score": 0.0})
    (root / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (root / "config.yaml").write_text("kl_coef: 0.05\nnote: <b>not bold</b>\n")
    return root


class Page(HTMLParser):
    """Tags, attributes, nesting errors and tables (rows of cell texts) of a page."""

    VOID = {"img", "meta", "br", "hr", "link", "input"}

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.attrs, self.stack, self.nesting_errors = Counter(), [], [], []
        self.tables, self._table, self._cell = {}, None, None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        self.attrs += [(tag, key, value or "") for key, value in attrs]
        if tag not in self.VOID:
            self.stack.append(tag)
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id") or f"{attrs.get('class')}-{len(self.tables)}", [])
        elif tag == "tr":
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.nesting_errors.append((tag, list(self.stack)))
            return
        self.stack.pop()
        if tag in ("td", "th"):
            self._table[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("report") / "run")
    (run / "summary.json").write_text(json.dumps({"gold before": 1.0, "note": "from summary.json"}))
    path = build_report(run, extra={"gold before": 2.5, "SFT held-out perplexity": 41.2})
    return run, path, path.read_text(encoding="utf-8")


def summary_table(page: Page) -> dict[str, str]:
    return {row[0]: row[1] for row in page.tables["summary-table"]}


def test_every_plot_is_written_as_a_png_and_embedded(full_report):
    run, path, text = full_report
    assert path == run / "report.html"
    for stem in PLOT_NAMES:
        png = (run / "plots" / f"{stem}.png").read_bytes()
        assert png[:8] == PNG_SIGNATURE, stem
        assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in text, stem
    assert "not-logged" not in text  # everything was logged


def test_page_parses_nests_properly_and_references_only_local_content(full_report):
    _, _, text = full_report
    page = Page(text)
    assert page.nesting_errors == [] and page.stack == []
    assert page.tags["img"] == len(PLOT_NAMES)
    assert page.tags["table"] >= 2 and "samples-side-by-side" in page.tables
    assert not {"script", "link", "iframe", "object"} & set(page.tags)
    for tag, key, value in page.attrs:
        assert "http://" not in value and "https://" not in value, (tag, key)
        if key in ("src", "href"):
            assert value.startswith(("data:", "#")) or ":" not in value, (tag, key, value[:40])
    assert "http://" not in text and "https://" not in text


def test_samples_show_the_same_eval_prompts_at_first_middle_and_last_update(full_report):
    _, _, text = full_report
    header, *rows = Page(text).tables["samples-side-by-side"]
    assert header == ["prompt", "update 1", "update 10", "update 20"]
    assert [row[0] for row in rows] == list(PROMPTS)  # the eval split wins over train samples
    q0 = rows[0]
    assert [cell.split("score")[0] for cell in q0[1:]] == ["r0@1", "r0@10", "r0@20"]
    assert "gold" in q0[1] and "train response" not in text


def test_text_from_the_run_is_escaped(full_report):
    _, _, text = full_report
    assert "<script" not in text.lower()
    assert html.escape(SCRIPT) in text
    assert "&lt;b&gt;not bold&lt;/b&gt;" in text  # config.yaml shown verbatim, escaped
    row = Page(text).tables["samples-side-by-side"][2]
    assert row[0] == "q1" and row[3].startswith(SCRIPT)  # the parser sees it as text, not a tag


def test_summary_merges_summary_json_and_extra_and_reports_the_gao_fit(full_report):
    _, _, text = full_report
    summary = summary_table(Page(text))
    assert summary["gold before"] == "2.5"  # extra wins over summary.json
    assert summary["note"] == "from summary.json" and summary["SFT held-out perplexity"] == "41.2"
    fit = {k.split(": ")[-1]: v for k, v in summary.items() if k.startswith("Gao et al. RL fit")}
    assert fit == {"α": f"{ALPHA:.4g}", "β": f"{BETA:.4g}"}
    peak = math.exp(ALPHA / BETA - 1)
    assert summary["fitted gold peak, d* = exp(α/β − 1)"].startswith(f"d* = {peak:.4g}")
    assert "eval/gold" in summary["fit points"]  # the fixed eval prompts are preferred for the fit


def test_run_without_gold_skips_gold_plots_and_removes_stale_ones(tmp_path):
    run = write_run(tmp_path / "run", gold=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({**r, "policy/clipfrac": "nan"}) + "\n" for r in rows))
    (run / "plots").mkdir()
    (run / "plots" / "gold_score.png").write_bytes(PNG_SIGNATURE)  # left over from an earlier build
    text = build_report(run).read_text()
    page = Page(text)
    assert not (run / "plots" / "gold_score.png").exists()
    assert not (run / "plots" / "clipfrac.png").exists()
    assert (run / "plots" / "gold_proxy_vs_kl.png").is_file()  # proxy against KL still plotted
    assert page.tags["img"] == len(PLOT_NAMES) - 2
    items = text.split('<ul id="not-logged">')[1].split("</ul>")[0]
    assert "Gold score" in items and "not logged (gold/score, eval/gold)" in items
    assert "policy/clipfrac logged, but never with a finite value" in items
    assert not any(k.startswith("Gao") for k in summary_table(page))


def test_train_samples_with_different_prompts_get_one_table_per_update(tmp_path):
    run = write_run(tmp_path / "run", eval_samples=False, train_prompts_vary=True)
    page = Page(build_report(run).read_text())
    assert "samples-side-by-side" not in page.tables
    tables = [rows for name, rows in page.tables.items() if name.startswith("samples-update")]
    assert [rows[1][0] for rows in tables] == ["train prompt 1", "train prompt 10", "train prompt 20"]


def test_gao_fit_recovers_alpha_and_beta():
    d = np.concatenate([[0.0], np.linspace(0.05, 5.0, 30)])  # d = 0 (the first update) carries no information
    gain = np.where(d > 0, d * (1.3 - 0.4 * np.log(np.where(d > 0, d, 1))), 0.0)
    fit = fit_gao_rl(d, gain)
    assert abs(fit.alpha - 1.3) < 1e-6 and abs(fit.beta - 0.4) < 1e-6 and fit.n_points == 30
    assert fit.peak_d == pytest.approx(math.exp(1.3 / 0.4 - 1))
    assert fit(np.array([fit.peak_d]))[0] == pytest.approx(0.4 * fit.peak_d)  # R(d*) = β·d*
    rising = fit_gao_rl(d, d * (1.0 + 0.2 * np.log(np.where(d > 0, d, 1))))
    assert rising.beta == pytest.approx(-0.2) and rising.peak_d is None
    assert fit_gao_rl(np.array([0.0, 1.0]), np.array([0.0, 0.5])) is None  # one usable point: underdetermined


def test_missing_metrics_or_run_dir_is_a_file_not_found_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_report(tmp_path)
    assert str(tmp_path / "metrics.jsonl") in str(err.value) and "PPO run directory" in str(err.value)
    with pytest.raises(FileNotFoundError, match="PPO run directory") as err:
        build_report(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)


def test_cli_report_prints_the_path_and_names_a_missing_run(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert cli_main(["report", str(run)]) == 0
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, tether.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_a_run_where_the_doctor_said_nothing_says_so(full_report):
    _, _, text = full_report
    assert 'id="doctor-clear"' in text and 'id="doctor"' not in text
