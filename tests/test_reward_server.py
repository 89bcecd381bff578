"""A reward server as a reward source: `tether serve-reward` (tether/pipelines/serve_reward.py) and
the `reward_url=` client (tether/http_reward.py). Scores over HTTP equal the in-process reward
model's; every way a server can fail ends in one message naming the URL and the cause; a tiny PPO
run trains against a server."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import base_overrides
from test_reward import preference_rows, reward_cfg, write_jsonl
from tether.config import ConfigError, PPOConfig, config_from_dict, load_config
from tether.http_reward import HttpReward, RewardServerUnavailable
from tether.pipelines.ppo import run_ppo
from tether.pipelines import serve_reward
from tether.pipelines.reward import run_reward
from tether.pipelines.serve_reward import build_reward_server
from tether.placement import load_reward_model
from tether.rewards import ModelReward, RewardError, RewardUnavailable, reward_eos
from tether.tiny import builtin_corpus
from tether.trainers.ppo import TrainingStopped

ROOT = Path(__file__).resolve().parents[1]


def rows(count: int, seed: int = 3) -> tuple[list[str], list[str]]:
    """Prompts (the first two words of a sentence) and responses (the rest), all different."""
    sentences = builtin_corpus(count, seed=seed)
    return [" ".join(s.split()[:2]) for s in sentences], [" " + " ".join(s.split()[2:]) for s in sentences]


def in_process_scores(model_dir: Path, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """What PPO's ModelReward scores with the reward model's own tokenizer, EOS appended."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    return ModelReward(model, tokenizer, eos=reward_eos(tokenizer)).score(prompts, responses, None, None)


@contextmanager
def serving(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def reward_server(tiny_dirs):
    """`tether serve-reward` on the tiny reward model, in a thread, on a free port."""
    with serving(build_reward_server(str(tiny_dirs["reward"]), port=0, batch_size=4, device="cpu")) as server:
        yield server


# --- the real server ------------------------------------------------------------------------


def test_scores_over_http_equal_the_in_process_reward_model(reward_server, tiny_dirs):
    prompts, responses = rows(23)
    responses[5] += "<|endoftext|>"  # a text that already ends in EOS gets no second one, in either
    client = HttpReward(reward_server.url + "/score", batch_size=5, concurrency=3)
    over_http = client.score(prompts, responses)
    expected = in_process_scores(tiny_dirs["reward"], prompts, responses)
    assert over_http.dtype == torch.float32 and over_http.shape == (23,)
    torch.testing.assert_close(over_http, expected, rtol=0, atol=1e-6)
    assert over_http.std() > 0  # scores that differ: the order is checked too


def test_the_prompt_is_part_of_the_scored_text(reward_server):
    client = HttpReward(reward_server.url)
    same_response = client.score(["the cat", "a dog"], [" sat on the mat", " sat on the mat"])
    assert same_response[0] != same_response[1]


def test_health_answers_ok_and_names_the_model(reward_server, tiny_dirs):
    with urllib.request.urlopen(reward_server.url + "/health", timeout=5) as answer:
        assert json.loads(answer.read()) == {"status": "ok", "model": str(tiny_dirs["reward"])}


@pytest.mark.parametrize("body, message", [
    (b"not json", "the body is not JSON"),
    (b'{"prompts": ["a"]}', "missing key 'responses'"),
    (b'{"prompts": ["a", "b"], "responses": ["x"]}', "2 prompts for 1 responses"),
    (b'{"prompts": ["a"], "responses": [3]}', "'responses' must be a list of strings"),
    (b'[1, 2]', "must be a JSON object"),
])
def test_a_bad_request_is_answered_400_naming_the_problem(reward_server, body, message):
    request = urllib.request.Request(reward_server.url + "/score", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 400
    assert message in json.loads(caught.value.read())["error"]


def test_an_empty_batch_is_scored_as_empty(reward_server):
    assert HttpReward(reward_server.url).score([], []).shape == (0,)


def test_serve_reward_command_serves_until_sigterm(tiny_dirs):
    prompts, responses = rows(9, seed=4)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen([sys.executable, "-m", "tether", "serve-reward", str(tiny_dirs["reward"]), "--port",
                                "0", "--batch-size", "4", "--device", "cpu"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = process.stdout.readline()  # blocks until the ready line (or the process ends)
        found = re.fullmatch(r"serving reward model (.+) on (http://127\.0\.0\.1:\d+)\n", ready)
        assert found, (ready, process.stderr.read() if process.poll() is not None else "")
        assert found.group(1) == str(tiny_dirs["reward"])
        scores = HttpReward(found.group(2) + "/score", batch_size=4, concurrency=2).score(prompts, responses)
        torch.testing.assert_close(scores, in_process_scores(tiny_dirs["reward"], prompts, responses),
                                   rtol=0, atol=1e-6)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "stopped" in out


def test_a_port_in_use_is_named_before_the_model_loads(tiny_dirs, monkeypatch):
    monkeypatch.setattr(serve_reward, "load_served_reward", lambda *a: pytest.fail("the model loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is already in use"):
            build_reward_server(str(tiny_dirs["reward"]), port=port)


def test_a_path_without_a_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        build_reward_server(str(tmp_path / "missing"), port=0)
    with pytest.raises(ValueError, match="holds no model"):
        build_reward_server(str(tmp_path), port=0)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    rows = preference_rows()
    return {"train": write_jsonl(root / "train.jsonl", rows[:36]), "eval": write_jsonl(root / "eval.jsonl", rows[36:])}


def test_a_lora_reward_adapter_is_served_like_in_process(tiny_dirs, pair_files, tmp_path):
    threads = torch.get_num_threads()
    try:
        run_reward(reward_cfg(tiny_dirs, pair_files, tmp_path / "rm", lora_rank=4, epochs=0.5))
    finally:
        torch.set_num_threads(threads)  # run_reward sets the thread count
    final = tmp_path / "rm" / "final"
    assert (final / "adapter_config.json").is_file()
    prompts, responses = rows(7, seed=6)
    tokenizer = AutoTokenizer.from_pretrained(final)
    expected = ModelReward(load_reward_model(str(final)).eval(), tokenizer, eos=reward_eos(tokenizer)).score(
        prompts, responses, None, None)
    with serving(build_reward_server(str(final), port=0, device="cpu")) as server:
        scores = HttpReward(server.url, batch_size=3, concurrency=2).score(prompts, responses)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)


# --- servers that fail ------------------------------------------------------------------------


@contextmanager
def fake_server(answer):
    """A server answering the n-th POST (from 1) with answer(n, payload) -> (status, body bytes)."""
    requests: list[dict] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                requests.append(payload)
                number = len(requests)
            status, body = answer(number, payload)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (a timeout test)
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with serving(server):
        yield f"http://127.0.0.1:{server.server_port}/score", requests


def scores_of(values) -> bytes:
    return json.dumps({"scores": values}).encode()


def fast_client(url: str, **options) -> HttpReward:
    return HttpReward(url, **{"timeout_s": 5.0, "retries": 2, "backoff_s": 0.01, **options})


def test_a_server_slower_than_the_timeout_stops_the_run_with_a_checkpoint():
    def slow(number, payload):
        time.sleep(1.0)
        return 200, scores_of([0.0] * len(payload["responses"]))

    with fake_server(slow) as (url, requests):
        started = time.monotonic()
        with pytest.raises(RewardUnavailable) as caught:  # the trainer stops with a checkpoint on it
            fast_client(url, timeout_s=0.3, retries=1).score(["p"], ["r"])
        assert time.monotonic() - started < 1.5
    message = str(caught.value)
    assert url in message and "did not answer within reward_url_timeout_s=0.3 s (after 2 tries)" in message
    assert "raise reward_url_timeout_s" in message


def test_http_500_is_retried_then_named_with_the_body():
    with fake_server(lambda n, p: (500, b"CUDA out of memory " + b"x" * 400)) as (url, requests):
        with pytest.raises(RewardServerUnavailable) as caught:
            fast_client(url, retries=2).score(["p"], ["r"])
    assert len(requests) == 3  # retries + 1
    message = str(caught.value)
    assert url in message and "answered HTTP 500: 'CUDA out of memory xxx" in message and "(after 3 tries)" in message
    assert "x" * 201 not in message  # the body quoted, not dumped


def test_http_4xx_is_not_retried():
    with fake_server(lambda n, p: (404, b'{"error": "no such endpoint"}')) as (url, requests):
        with pytest.raises(RewardError, match=re.escape(f"reward server {url} answered HTTP 404")) as caught:
            fast_client(url).score(["p"], ["r"])
    assert len(requests) == 1 and not isinstance(caught.value, RewardUnavailable)
    assert "no such endpoint" in str(caught.value)


@pytest.mark.parametrize("body, cause", [
    (b"<html>Bad Gateway</html>", "answered with malformed JSON: '<html>Bad Gateway</html>'"),
    (b'{"score": [1.0, 2.0]}', 'answered without a "scores" key'),
    (scores_of([1.0]), "returned 1 scores for 2 responses"),
    (scores_of(["high", "low"]), "must return a list of numbers"),
])
def test_an_answer_that_cannot_be_right_fails_at_once_naming_the_cause(body, cause):
    with fake_server(lambda n, p: (200, body)) as (url, requests):
        with pytest.raises(RewardError) as caught:
            fast_client(url).score(["p", "q"], ["r", "s"])
    assert len(requests) == 1
    message = str(caught.value)
    assert url in message and cause in message and "docs/reward-server.md" in message


def test_a_non_finite_score_names_the_response_across_batches():
    def nan_at_row_3(number, payload):
        values = [float("nan") if r == " the bad one" else 0.5 for r in payload["responses"]]
        return 200, json.dumps({"scores": values}).encode()  # json writes NaN, as Python servers do

    responses = [" one", " two", " three", " the bad one", " five"]
    with fake_server(nan_at_row_3) as (url, requests):
        with pytest.raises(RewardError) as caught:
            fast_client(url, batch_size=2, concurrency=2).score(["p"] * 5, responses)
    message = str(caught.value)
    assert url in message and "non-finite score (nan) for response 3: ' the bad one'" in message


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_refused_connection_says_how_to_start_the_server():
    port = free_port()
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(RewardServerUnavailable) as caught:
        fast_client(url, retries=1).score(["p"], ["r"])
    message = str(caught.value)
    assert f"reward server {url} refused the connection (after 2 tries)" in message
    assert f"is the server running? start it with `tether serve-reward RUN_DIR/final --port {port}`" in message
    with pytest.raises(RewardError, match="refused the connection; is the server running"):
        fast_client(url).check_reachable()  # what a PPO run checks before any model loads


def test_a_503_then_an_answer_is_retried_to_success():
    with fake_server(lambda n, p: (503, b"warming up") if n == 1 else (200, scores_of([0.25, 0.75]))) as (url, requests):
        scores = fast_client(url, retries=1).score(["p", "q"], ["r", "s"])
    assert scores.tolist() == [0.25, 0.75] and len(requests) == 2


def test_columns_are_sent_and_scores_come_back_in_order_from_concurrent_batches():
    def answer_length(number, payload):
        time.sleep(0.05 * (3 - number % 3))  # later batches may answer first
        assert len(payload["prompts"]) == len(payload["responses"]) == len(payload["columns"]["answer"])
        return 200, json.dumps({"rewards": [float(len(a)) for a in payload["columns"]["answer"]]}).encode()

    answers = ["x" * n for n in range(11)]
    with fake_server(answer_length) as (url, requests):
        scores = fast_client(url, batch_size=3, concurrency=3).score(
            ["p"] * 11, ["r"] * 11, columns={"answer": answers, "id": list(range(11))})
    assert scores.tolist() == [float(n) for n in range(11)]
    assert len(requests) == 4 and requests[0]["columns"]["id"] in ([0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10])


def test_no_columns_are_sent_as_an_empty_mapping():
    with fake_server(lambda n, p: (200, scores_of([1.0]))) as (url, requests):
        fast_client(url).score(["p"], ["r"])
    assert requests == [{"prompts": ["p"], "responses": ["r"], "columns": {}}]


# --- config ------------------------------------------------------------------------------------

REQUIRED = ["policy=some/model", "prompts=p.jsonl"]


def test_reward_url_is_one_reward_source_among_the_others():
    cfg = load_config(PPOConfig, None, REQUIRED + ["reward_url=http://127.0.0.1:8000/score"])
    assert (cfg.reward_url_timeout_s, cfg.reward_url_retries, cfg.reward_url_batch_size,
            cfg.reward_url_concurrency) == (30.0, 2, 64, 4)
    with pytest.raises(ConfigError, match="exactly one of .*reward_url.*; got reward_fn and reward_url"):
        load_config(PPOConfig, None, REQUIRED + ["reward_fn=m:f", "reward_url=http://127.0.0.1:8000/score"])
    with pytest.raises(ConfigError, match="got reward_model and reward_url"):
        load_config(PPOConfig, None, REQUIRED + ["reward_model=org/rm", "reward_url=http://h:1"])


@pytest.mark.parametrize("override, message", [
    ("reward_url=runs/rm/final", "reward_url must be an http:// or https:// address"),
    ("reward_url=ftp://host/score", "reward_url must be an http:// or https:// address"),
    ("reward_url=http://host:99999/score", "has a bad port"),
    ("reward_url_timeout_s=0", "reward_url_timeout_s must be > 0"),
    ("reward_url_batch_size=0", "reward_url_batch_size must be >= 1"),
    ("reward_url_concurrency=0", "reward_url_concurrency must be >= 1"),
    ("reward_url_retries=-1", "reward_url_retries must be >= 0"),
])
def test_bad_reward_url_settings_are_refused(override, message):
    url = [] if override.startswith("reward_url=") else ["reward_url=http://127.0.0.1:8000/score"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(PPOConfig, None, REQUIRED + url + [override])


def test_the_client_refuses_an_address_that_is_not_http():
    with pytest.raises(ConfigError, match="http:// or https://"):
        HttpReward("localhost:8000")


# --- PPO against a server ----------------------------------------------------------------------


def ppo_values(tiny_dirs, tmp_path, url, **extra):
    return base_overrides(tiny_dirs, tmp_path, **{**dict(
        reward_fn=None, reward_url=url, reward_url_batch_size=3, reward_url_concurrency=2, total_updates=2,
        batch_size=4, num_minibatches=1, ppo_epochs=1, max_new_tokens=6, num_threads=1), **extra})


def metric_rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_ppo_trains_against_the_served_reward_model(reward_server, tiny_dirs, tmp_path):
    run_ppo(config_from_dict(PPOConfig, ppo_values(tiny_dirs, tmp_path, reward_server.url + "/score")))
    scores = [row["reward/score"] for row in metric_rows(tmp_path) if "reward/score" in row]
    assert len(scores) == 2 and all(abs(s) < 10 for s in scores)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_ppo_shared_base_takes_its_scores_from_the_server(tiny_dirs, tmp_path):
    with fake_server(lambda n, p: (200, scores_of([0.375] * len(p["responses"])))) as (url, requests):
        run_ppo(config_from_dict(PPOConfig, ppo_values(tiny_dirs, tmp_path, url, total_updates=1,
                                                       placement="shared_base", lora_rank=4)))
    assert [row["reward/score"] for row in metric_rows(tmp_path) if "reward/score" in row] == [0.375]
    assert sum(len(r["responses"]) for r in requests) == 4 and len(requests) == 2  # batches of 3: 3 + 1


def test_ppo_with_no_server_listening_fails_before_models_load(tiny_dirs, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/score"
    with pytest.raises(RewardError, match=re.escape(f"reward server {url} refused the connection")):
        run_ppo(config_from_dict(PPOConfig, ppo_values(tiny_dirs, tmp_path, url)))


def test_a_server_that_goes_away_mid_run_stops_ppo_with_a_checkpoint(tiny_dirs, tmp_path):
    def fails_after_the_first_update(number, payload):  # update 1: 4 responses in batches of 3 = 2 requests
        return (200, scores_of([0.5] * len(payload["responses"]))) if number <= 2 else (503, b"restarting")

    with fake_server(fails_after_the_first_update) as (url, requests):
        with pytest.raises(TrainingStopped) as caught:
            run_ppo(config_from_dict(PPOConfig, ppo_values(tiny_dirs, tmp_path, url, reward_url_retries=0)))
    message = str(caught.value)
    assert f"reward server {url} answered HTTP 503: 'restarting'" in message and "resume=true" in message
    assert caught.value.checkpoint == tmp_path / "run" / "checkpoint-1" and caught.value.checkpoint.is_dir()
