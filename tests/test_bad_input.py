"""The catalogue of bad input: every expected failure is one line on stderr that names the item,
exit code 2 for configuration/data/path errors and 1 for runtime failures, no traceback, and an
earlier run in the same output_dir is left byte for byte as it was.

Each case runs the real CLI in-process (`tether.cli.main`) against a directory that already
holds a finished run (unless the case needs another one).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REWARDS
from tether.cli import main

HERE = Path(__file__)


def broken_at_import(responses):  # referenced by name only; the module below fails to import
    return responses


@pytest.fixture(scope="module")
def earlier(tiny_dirs, tmp_path_factory):
    """A finished PPO run (one update, a checkpoint) that no failing command may touch."""
    root = tmp_path_factory.mktemp("earlier")
    run = root / "run"
    code = main(["ppo", *ppo_args(tiny_dirs, run, total_updates=1, save_every=1)])
    assert code == 0
    return run


def ppo_args(tiny_dirs, run, **extra):
    values = dict(policy=tiny_dirs["gpt2"], prompts=tiny_dirs["prompts"], reward_fn=f"{REWARDS}:letter_o_rate",
                  output_dir=run, total_updates=1, batch_size=4, num_minibatches=1, ppo_epochs=1, max_new_tokens=4,
                  learning_rate=1e-3, progress="false", num_threads=1)
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items() if v is not None]


@pytest.fixture(autouse=True)
def restore_threads():
    """Each run sets torch's thread count; keep the rest of the suite's setting."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def files(tmp: Path) -> dict[str, Path]:
    """Bad data files, written once per test."""
    made = {}
    made["bad_json"] = tmp / "bad.jsonl"
    made["bad_json"].write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    made["latin1"] = tmp / "latin1.jsonl"
    made["latin1"].write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    made["semicolon"] = tmp / "semi.csv"
    made["semicolon"].write_text("prompt;id\nhello;1\n")
    made["no_field"] = tmp / "nofield.jsonl"
    made["no_field"].write_text('{"text": "hello"}\n')
    made["empty"] = tmp / "empty.jsonl"
    made["empty"].write_text("")
    made["odd_suffix"] = tmp / "prompts.xlsx"
    made["odd_suffix"].write_text("x")
    made["file_not_dir"] = tmp / "a_file"
    made["file_not_dir"].write_text("x")
    made["no_model"] = tmp / "empty_dir"
    made["no_model"].mkdir(exist_ok=True)
    made["import_fails"] = tmp / "import_fails.py"
    made["import_fails"].write_text("raise RuntimeError('no GPU here')\ndef score(r):\n    return r\n")
    made["raises"] = tmp / "raises.py"
    made["raises"].write_text("def score(responses):\n    raise KeyError('missing label')\n")
    made["short"] = tmp / "short.py"
    made["short"].write_text("def score(responses):\n    return [0.0]\n")
    made["nan"] = tmp / "nan.py"
    made["nan"].write_text("def score(responses):\n    return [float('nan')] * len(responses)\n")
    made["batch_only"] = tmp / "batch_only.py"
    made["batch_only"].write_text("def score(responses):\n    assert len(responses) == 1, 'batch too big'\n"
                                  "    return [0.0]\n")
    made["exits"] = tmp / "exits.py"
    made["exits"].write_text("import sys\ndef score(responses):\n    sys.exit(0)\n")
    made["as_dict"] = tmp / "as_dict.py"
    made["as_dict"].write_text("def score(responses):\n    return {0.5: 'a', 0.25: 'b', 0.0: 'c', 1.0: 'd'}\n")
    made["sft_run"] = tmp / "sft_run"
    made["sft_run"].mkdir(exist_ok=True)
    (made["sft_run"] / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.5}\n')
    made["empty_run"] = tmp / "empty_run"
    made["empty_run"].mkdir(exist_ok=True)
    (made["empty_run"] / "metrics.jsonl").write_text("")
    made["bad_yaml"] = tmp / "bad.yaml"
    made["bad_yaml"].write_text("batch_size: [1, 2\n")
    made["list_yaml"] = tmp / "list.yaml"
    made["list_yaml"].write_text("- 1\n- 2\n")
    return made


# (id, stage, overrides given as {key: value or a name from files()}, exit code, regex the message must match)
PPO_CASES = [
    ("unknown key", {"batch_sise": 4}, 2, r"unknown config key 'batch_sise'.*did you mean batch_size"),
    ("wrong type", {"batch_size": "four"}, 2, r"batch_size"),
    ("zero batch", {"batch_size": 0}, 2, r"batch_size must be >= 1"),
    ("indivisible", {"batch_size": 4, "num_minibatches": 3}, 2, r"batch_size=4 is not divisible by num_minibatches=3"),
    ("negative grad norm", {"max_grad_norm": -1}, 2, r"max_grad_norm must be > 0 or null"),
    ("zero value clip", {"value_clip_eps": 0}, 2, r"value_clip_eps must be > 0 or null"),
    ("clip low too big", {"clip_eps_low": 1.5}, 2, r"clip_eps_low must be in \(0, 1\)"),
    ("clip high negative", {"clip_eps_high": -0.1}, 2, r"clip_eps_high must be > 0"),
    ("negative ptx", {"ptx_coef": -1}, 2, r"ptx_coef must be >= 0"),
    ("zero temperature", {"temperature": 0}, 2, r"temperature must be > 0"),
    ("top_p", {"top_p": 1.5}, 2, r"top_p must be in \(0, 1\]"),
    ("min new tokens", {"min_new_tokens": 5}, 2, r"min_new_tokens must be in \[0, max_new_tokens=4\], got 5"),
    ("zero lr", {"learning_rate": 0}, 2, r"learning_rate must be > 0"),
    ("negative kl", {"kl_coef": -0.1}, 2, r"kl_coef must be >= 0"),
    ("gamma", {"gamma": 1.5}, 2, r"gamma and lam must be in \[0, 1\]"),
    ("adam eps", {"adam_eps": 0}, 2, r"adam_eps must be > 0"),
    ("keep checkpoints", {"keep_checkpoints": -1}, 2, r"keep_checkpoints must be >= 0"),
    ("max skipped", {"max_skipped_updates": 0}, 2, r"max_skipped_updates must be >= 1"),
    ("dual clip", {"dual_clip": 0.5}, 2, r"dual_clip must be > 1"),
    ("infinite lr", {"learning_rate": "inf"}, 2, r"learning_rate must be a finite number, got 'inf'"),
    ("lr 1e400", {"learning_rate": "1e400"}, 2, r"learning_rate must be a finite number, got '1e400'"),
    ("nan temperature", {"temperature": "NaN"}, 2, r"temperature must be a finite number, got 'NaN'"),
    ("yaml nan kl", {"kl_coef": ".nan"}, 2, r"kl_coef must be a finite number, got nan"),
    ("infinite critic lr", {"critic_learning_rate": "-.inf"}, 2, r"critic_learning_rate must be a finite number"),
    ("empty stop string", {"stop_strings": "['']"}, 2, r"stop_strings holds an empty string.*remove it"),
    ("two rewards", {"reward_model": "REWARD_DIR"}, 2, r"exactly one of reward_model.*reward_fn.*got reward_model and reward_fn"),
    ("no reward", {"reward_fn": None}, 2, r"exactly one of reward_model.*reward_fn.*none is set"),
    ("reward fn without colon", {"reward_fn": "mymodule.score"}, 2, r"reward_fn must look like"),
    ("shared_base without lora", {"placement": "shared_base"}, 2, r"set lora_rank"),
    ("lora with separate", {"lora_rank": 4}, 2, r"use placement=shared_base"),
    ("warmup too long", {"critic_warmup_updates": 1}, 2, r"critic_warmup_updates=1 leaves no update"),
    ("longer than the positions", {"max_prompt_length": 200, "max_new_tokens": 60}, 2,
     r"max_prompt_length \+ max_new_tokens = 260 tokens is longer than .* can embed \(256 positions\); lower"),
    ("unknown sink", {"log_with": "[mlflow]"}, 2, r"log_with: unknown sink"),
    ("missing prompts", {"prompts": None}, 2, r"prompts"),
    ("policy path missing", {"policy": "./no/such/model"}, 2, r"policy=./no/such/model: no such directory"),
    ("hub id offline", {"policy": "no-such-org/no-such-model"}, 2,
     r"policy=no-such-org/no-such-model is not a local directory, and as a hub id it is not in the local cache "
     r"while HF_HUB_OFFLINE=1"),
    ("policy is a file", {"policy": "file_not_dir"}, 2, r"policy=.*a_file is a file"),
    ("policy dir without model", {"policy": "no_model"}, 2, r"policy=.*empty_dir holds no model"),
    ("resume and overwrite", {"resume": "true", "overwrite": "true"}, 2, r"contradict each other"),
    ("prompts not found", {"prompts": "./nope.jsonl"}, 2, r"file not found: ./nope.jsonl"),
    ("invalid jsonl line", {"prompts": "bad_json"}, 2, r"bad.jsonl: line 2 is not valid JSON"),
    ("not utf-8", {"prompts": "latin1"}, 2, r"latin1.jsonl: line 2 is not UTF-8"),
    ("semicolon csv", {"prompts": "semicolon"}, 2, r"semi.csv: .*looks semicolon-separated"),
    ("missing field", {"prompts": "no_field"}, 2, r"has no 'prompt' field.*\['text'\].*set prompt_field"),
    ("empty prompts", {"prompts": "empty"}, 2, r"empty"),
    ("unsupported suffix", {"prompts": "odd_suffix"}, 2, r"unsupported file type '.xlsx'"),
    ("reward module missing", {"reward_fn": "no_such_module_xyz:score"}, 2, r"cannot import module 'no_such_module_xyz'"),
    ("reward module fails to import", {"reward_fn": "import_fails:score"}, 2,
     r"import_fails.py fails to import: RuntimeError: no GPU here"),
    ("reward function missing", {"reward_fn": f"{HERE}:no_such_function"}, 2, r"has no function 'no_such_function'"),
    ("tokenizer path missing", {"tokenizer": "./no/tokenizer"}, 2, r"tokenizer=./no/tokenizer: no such directory"),
    ("reference with another vocabulary", {"reference": "OTHER_VOCAB"}, 2,
     r"reference .* has a different tokenizer/vocabulary than the policy"),
    ("shared_base critic of its own", {"placement": "shared_base", "lora_rank": 4, "critic": "REWARD_DIR"}, 2,
     r"critic=.* is a model of its own.*placement=separate"),
    ("lora targets match nothing", {"placement": "shared_base", "lora_rank": 4, "lora_target_modules": "[nothing_here]"},
     2, r"nothing_here.*c_attn|c_attn.*nothing_here"),
]

# Cases that run (or need their own directory) and fail while running.
RUNTIME_CASES = [
    ("reward raises on a sample", {"reward_fn": "raises:score", "output_dir": "NEW"}, 1,
     r"raised KeyError: 'missing label' on response 0 '"),
    ("reward fails on a whole batch only", {"reward_fn": "batch_only:score", "output_dir": "NEW"}, 1,
     r"raised AssertionError: batch too big at batch_only.py:2 in score on the batch of 4 responses \(first: .*"
     r"each response alone scores fine"),
    ("reward returns too few", {"reward_fn": "short:score", "output_dir": "NEW"}, 1, r"returned 1 scores for 4 responses"),
    ("reward calls sys.exit", {"reward_fn": "exits:score", "output_dir": "NEW"}, 1,
     r"called sys.exit\(0\) while scoring 4 responses; a reward function must return scores"),
    ("reward returns a dict", {"reward_fn": "as_dict:score", "output_dir": "NEW"}, 1,
     r"must return a list of numbers \(one per response\), got dict"),
    ("scores all NaN", {"reward_fn": "nan:score", "output_dir": "NEW", "total_updates": 5, "max_skipped_updates": 2},
     1, r"2 updates in a row were skipped; the first because the rollout had a non-finite score \(nan\) for response 0"),
    ("existing run", {}, 2, r"already holds a run.*resume=true.*overwrite=true"),
    ("resume changed config", {"resume": "true", "learning_rate": 0.5}, 2, r"changed: learning_rate: 0.001 -> 0.5"),
    ("nothing to resume", {"resume": "true", "output_dir": "NEW"}, 2, r"nothing to resume"),
    ("output dir is a file", {"output_dir": "file_not_dir"}, 2, r"output_dir .*a_file is a file"),
]


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory):
    """A tiny model whose tokenizer is not the policy's."""
    from tether.tiny import build_tiny_causal_lm, builtin_corpus, train_tokenizer

    path = tmp_path_factory.mktemp("other_vocab")
    tokenizer = train_tokenizer(builtin_corpus(400, seed=9), vocab_size=320)  # merges the policy lacks
    build_tiny_causal_lm("gpt2", tokenizer, seed=0, hidden=16, layers=1, heads=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def resolve(value, made, tiny_dirs, tmp_path):
    if value == "REWARD_DIR":
        return tiny_dirs["reward"]
    if value == "OTHER_VOCAB":
        return made["other_vocab"]
    if value == "NEW":
        return tmp_path / "new_run"
    if isinstance(value, str) and value.split(":")[0] in made:
        name, _, rest = value.partition(":")
        return f"{made[name]}:{rest}" if rest else made[name]
    return value


def run_case(overrides, tiny_dirs, earlier, tmp_path, capsys, stage_args=None, other_vocab=None):
    made = {**files(tmp_path), "other_vocab": other_vocab}
    extra = {k: resolve(v, made, tiny_dirs, tmp_path) for k, v in overrides.items()}
    before = snapshot(earlier)
    capsys.readouterr()
    code = main(stage_args or ["ppo", *ppo_args(tiny_dirs, earlier, **extra)])
    err = capsys.readouterr().err
    assert snapshot(earlier) == before, "the earlier run changed"
    return code, err


# The input cases ask to overwrite the earlier run: a failing check must still leave it intact.
CASES = [(n, {"overwrite": "true", **o}, c, p) for n, o, c, p in PPO_CASES] + RUNTIME_CASES


@pytest.mark.parametrize("name,overrides,code,pattern", CASES, ids=[c[0] for c in CASES])
def test_ppo_bad_input(name, overrides, code, pattern, tiny_dirs, earlier, tmp_path, capsys, other_vocab):
    got, err = run_case(overrides, tiny_dirs, earlier, tmp_path, capsys, other_vocab=other_vocab)
    message = [line for line in err.splitlines() if line.startswith("tether: error:")]
    assert got == code, err
    assert len(message) == 1, err
    assert __import__("re").search(pattern, message[0]), message[0]
    assert "Traceback" not in err


OTHER_CASES = [
    ("config file missing", ["ppo", "--config", "missing.yaml"], 2, r"config file not found: missing.yaml"),
    ("config file not yaml", ["ppo", "--config", "bad_yaml"], 2, r"is not valid YAML"),
    ("config file a list", ["ppo", "--config", "list_yaml"], 2, r"must hold a mapping"),
    ("override without =", ["ppo", "batch_size"], 2, r"override 'batch_size' must look like key=value"),
    ("sft zero grad norm", ["sft", "data=x.txt", "init=scratch", "max_grad_norm=0"], 2, r"max_grad_norm must be > 0"),
    ("sft model missing", ["sft", "data=x.txt", "model=./no/model"], 2, r"model=./no/model: no such directory"),
    ("sft block longer than the positions", ["sft", "data=x.txt", "model=MODEL", "block_size=4096"], 2,
     r"block_size = 4096 tokens is longer than .* can embed \(256 positions\); lower block_size"),
    ("reward eval fraction", ["reward", "model=MODEL", "data=x.jsonl", "eval_fraction=1.5"], 2,
     r"eval_fraction must be in \[0, 1\)"),
    ("reward half normalisation", ["reward", "model=MODEL", "data=x.jsonl", "normalize_policy=MODEL"], 2,
     r"normalize_policy and normalize_prompts go together"),
    ("export of a non-adapter", ["export", "no_model", "out_dir"], 2, r"adapter|adapter_config"),
    ("doctor on an sft run", ["doctor", "sft_run"], 2, r"holds no PPO update \(no reward/score in 1 rows\)"),
    ("doctor on empty metrics", ["doctor", "empty_run"], 2, r"holds no PPO update \(no reward/score in 0 rows\)"),
]


@pytest.mark.parametrize("name,argv,code,pattern", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_other_bad_input(name, argv, code, pattern, tiny_dirs, earlier, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = files(tmp_path)
    argv = [str(made.get(a, a)).replace("MODEL", str(tiny_dirs["gpt2"])) for a in argv]
    got, err = run_case({}, tiny_dirs, earlier, tmp_path, capsys, stage_args=argv)
    message = [line for line in err.splitlines() if line.startswith("tether: error:")]
    assert got == code and len(message) == 1, err
    assert __import__("re").search(pattern, message[0]), message[0]
    assert "Traceback" not in err


def test_a_locked_directory_is_refused_and_debug_shows_the_traceback(tiny_dirs, earlier, tmp_path, capsys):
    run = tmp_path / "locked"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".tether.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        code, err = run_case({"output_dir": run}, tiny_dirs, earlier, tmp_path, capsys)
        assert code == 2 and f"another tether run (pid {sleeper.pid}" in err and "Traceback" not in err
        with pytest.raises(Exception, match="another tether run"):
            main(["--debug", "ppo", *ppo_args(tiny_dirs, run)])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_cli_process_exits_with_the_code_and_one_line(tiny_dirs, tmp_path):
    """The same, through a real process: exit status and stderr as a shell sees them."""
    out = subprocess.run([sys.executable, "-m", "tether", "ppo", *ppo_args(tiny_dirs, tmp_path / "r", max_grad_norm=-1)],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "tether: error: config error: max_grad_norm must be > 0 or null (off), got -1.0"


def test_ctrl_c_stops_the_cli_with_a_checkpoint_and_one_line(tiny_dirs, tmp_path):
    """SIGINT to a running `tether ppo`: the update finishes, checkpoint-N is written, one line says
    where and how to resume, exit 130; the resumed run completes."""
    import signal
    import time

    run = tmp_path / "run"
    args = ppo_args(tiny_dirs, run, total_updates=400)
    process = subprocess.Popen([sys.executable, "-m", "tether", "ppo", *args], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and process.poll() is None, "the run never started"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    message = [line for line in err.splitlines() if line.startswith("tether: error:")]
    assert len(message) == 1 and "stopped by SIGINT after update" in message[0] and "resume=true" in message[0], err
    assert "Traceback" not in err
    checkpoint = next(run.glob("checkpoint-*"))
    assert str(checkpoint) in message[0]
    update = int(checkpoint.name.split("-")[1])
    resumed = main(["ppo", *ppo_args(tiny_dirs, run, total_updates=update + 1, resume="true")])
    assert resumed == 0 and (run / "final").is_dir()


def test_an_update_skipped_after_its_first_step_leaves_weights_and_optimizer_state_bitwise_as_before(tiny_dirs,
                                                                                                     tmp_path):
    """A non-finite gradient at the second of four optimizer steps: the first step is undone too."""
    import torch

    from tether.config import PPOConfig, config_from_dict
    from tether.pipelines.ppo import build_ppo_trainer
    from tether.trainers.ppo import NonFiniteError

    values = dict(policy=str(tiny_dirs["gpt2"]), prompts=str(tiny_dirs["prompts"]), output_dir=str(tmp_path / "run"),
                  reward_fn=f"{REWARDS}:letter_o_rate", total_updates=3, batch_size=8, num_minibatches=2,
                  ppo_epochs=2, max_new_tokens=8, learning_rate=1e-3, progress=False)
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, values))
    trainer.step()  # AdamW has state and the schedule has moved: both must come back exactly

    def state():
        weights = [p.detach().clone() for opt, _ in trainer.optimizers() for g in opt.param_groups for p in g["params"]]
        moments = [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                   for opt, _ in trainer.optimizers() for s in opt.state.values()]
        lrs = [(g["lr"], sched.state_dict()["last_epoch"]) for opt, sched in trainer.optimizers() for g in opt.param_groups]
        return weights, moments, lrs

    before = state()
    real_step, calls = trainer._clip_and_step, []

    def fails_second_time(optimizer, scheduler, name):
        calls.append(name)
        if len(calls) == 3:  # policy, value, then the policy's second step
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError("non-finite policy gradient norm (injected)")
        return real_step(optimizer, scheduler, name)

    trainer._clip_and_step = fails_second_time
    metrics = trainer.step()
    assert metrics == {"ppo/skipped_updates": 1.0} and len(calls) == 3
    after = state()
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert len(before[1]) == len(after[1])
    for a, b in zip(before[1], after[1]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    assert before[2] == after[2]
    trainer._clip_and_step = real_step
    assert "reward/score" in trainer.step()  # and training goes on from there


def test_a_moved_run_directory_resumes_and_a_shorter_total_is_refused_without_touching_it(tiny_dirs, tmp_path,
                                                                                             capsys):
    import shutil

    run, moved = tmp_path / "run", tmp_path / "elsewhere" / "run"
    assert main(["ppo", *ppo_args(tiny_dirs, run, total_updates=2, save_every=1)]) == 0
    shutil.copytree(run, moved)
    before = snapshot(moved)
    capsys.readouterr()
    assert main(["ppo", *ppo_args(tiny_dirs, moved, total_updates=1, save_every=1, resume="true")]) == 2
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tether: error:")]
    assert len(message) == 1 and "total_updates=1 is below the 2 updates" in message[0]
    assert "total_updates >= 2" in message[0]
    assert snapshot(moved) == before  # config.yaml still says 2
    assert main(["ppo", *ppo_args(tiny_dirs, moved, total_updates=3, save_every=1, resume="true")]) == 0
    assert len((moved / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_reward_tokenizer_padded_with_its_eos_still_has_an_eos(tiny_tokenizer):
    """A reward model's own tokenizer without a pad token is padded with EOS (the attention mask
    decides what counts): EOS must stay what ends a text, not be discarded as the pad."""
    import copy

    from tether.rewards import reward_eos

    own = copy.deepcopy(tiny_tokenizer)
    own.pad_token = own.eos_token
    ends, eos, pad = reward_eos(own)
    assert ends == [own.eos_token_id] and eos == pad == own.eos_token_id


@pytest.mark.parametrize("content", [None, "  "])
def test_chat_prompts_and_sft_records_with_null_or_empty_content_are_refused(tiny_dirs, tmp_path, capsys, content):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": content},
                                               {"role": "assistant", "content": "ok"}]}) + "\n")
    what = "null" if content is None else "empty"
    for argv in (["ppo", *ppo_args(tiny_dirs, tmp_path / "ppo", prompts=data, prompt_field="messages")],
                 ["sft", f"data={data}", "init=scratch", f"output_dir={tmp_path / 'sft'}", "progress=false"]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"record 1 message 0 (user) has {what} content; give it text or drop the message" in err, err
        assert "Traceback" not in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device,pattern", [
    ("cuda", r"device=cuda but this machine has no usable CUDA GPU .*use device=cpu or device=auto"),
    ("gpu0", r"device='gpu0' is not a device: use auto, cpu, cuda or cuda:N"),
])
def test_a_device_this_machine_lacks_is_refused_before_anything_loads(tiny_dirs, earlier, tmp_path, capsys, device,
                                                                       pattern):
    code, err = run_case({"device": device, "output_dir": "NEW"}, tiny_dirs, earlier, tmp_path, capsys)
    message = [line for line in err.splitlines() if line.startswith("tether: error:")]
    assert code == 2 and len(message) == 1 and __import__("re").search(pattern, message[0]), err
    assert not (tmp_path / "new_run").exists()


def test_export_never_writes_into_a_directory_it_did_not_create(tiny_dirs, earlier, tmp_path, capsys):
    from tether.config import PPOConfig, config_from_dict
    from tether.pipelines.ppo import build_ppo_trainer

    values = dict(policy=str(tiny_dirs["llama"]), prompts=str(tiny_dirs["prompts"]), output_dir=str(tmp_path / "run"),
                  reward_fn=f"{REWARDS}:letter_o_rate", total_updates=1, batch_size=4, num_minibatches=1,
                  ppo_epochs=1, max_new_tokens=4, placement="shared_base", lora_rank=4, progress=False)
    adapter = build_ppo_trainer(config_from_dict(PPOConfig, values)).save(tmp_path / "adapter")
    other_final = earlier / "final"
    cases = [([str(adapter), str(other_final)], r"already holds files .* pass --overwrite"),
             ([str(adapter), str(adapter)], r"is the adapter directory .* choose a new directory"),
             ([str(adapter), str(adapter / "merged")], r"is the adapter directory .* or around it")]
    for argv, pattern in cases:
        before = snapshot(earlier), snapshot(adapter)
        capsys.readouterr()
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert __import__("re").search(pattern, err) and "Traceback" not in err, err
        assert (snapshot(earlier), snapshot(adapter)) == before
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "notes.txt").write_text("mine")
    assert main(["export", str(adapter), str(merged)]) == 2 and (merged / "notes.txt").is_file()
    assert main(["export", str(adapter), str(merged), "--overwrite"]) == 0
    assert (merged / "model.safetensors").is_file() and not (merged / "notes.txt").exists()


def test_a_hub_id_that_cannot_be_reached_names_the_key_at_once(tiny_dirs, earlier, tmp_path, capsys, monkeypatch):
    """Without HF_HUB_OFFLINE: an id neither cached nor reachable fails in seconds, not after the hub's retries."""
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    started = time.monotonic()
    code, err = run_case({"policy": "no-such-org/no-such-model", "output_dir": "NEW"}, tiny_dirs, earlier, tmp_path,
                         capsys)
    assert code == 2 and "Traceback" not in err, err
    assert __import__("re").search(r"policy=no-such-org/no-such-model is not a local directory nor in the local hub "
                                   r"cache, and the hub \(http://127.0.0.1:9\) cannot be reached", err), err
    assert time.monotonic() - started < 30 and not (tmp_path / "new_run").exists()


def test_a_stage_never_replaces_run_files_it_did_not_write(tiny_dirs, earlier, tmp_path, capsys):
    """A user's own config.yaml inside output_dir (a common layout) is not a run to overwrite."""
    mine = tmp_path / "experiment"
    mine.mkdir()
    (mine / "config.yaml").write_text(f"policy: {tiny_dirs['llama']}\n# my notes\n")
    (mine / "summary.json").write_text("{}")
    before = snapshot(mine)
    for extra in ([], ["overwrite=true"]):
        capsys.readouterr()
        code = main(["ppo", "--config", str(mine / "config.yaml"), *ppo_args(tiny_dirs, mine), *extra])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert __import__("re").search(r"holds config.yaml, summary.json, which tether did not write .*choose another "
                                       r"output_dir", err), err
        assert snapshot(mine) == before
    assert (earlier / ".tether-run").is_file(), "a run tether wrote carries the marker"


@pytest.mark.parametrize("fresh", [[], ["--fresh"]])
def test_the_demo_never_clears_a_directory_it_did_not_write(tmp_path, capsys, fresh):
    """`tether demo --output-dir runs` beside `tether ppo`'s runs/ppo, or a user's own folder."""
    runs = tmp_path / "runs"
    (runs / "ppo").mkdir(parents=True)
    (runs / "ppo" / "metrics.jsonl").write_text('{"update": 1}\n')
    (runs / "notes.txt").write_text("mine")
    before = snapshot(runs)
    capsys.readouterr()
    assert main(["demo", "--output-dir", str(runs), *fresh]) == 2
    err = capsys.readouterr().err
    assert "holds files the demo did not write (notes.txt, ppo); " in err and "choose a new or empty directory" in err
    assert "Traceback" not in err and snapshot(runs) == before


def test_fresh_in_the_demos_own_directory_keeps_what_the_demo_did_not_write(tmp_path):
    from tether.pipelines.demo import OWNER, claim_demo_dir

    run = tmp_path / "demo"
    claim_demo_dir(run, fresh=False)  # new: claimed
    (run / "sft").mkdir()
    (run / "summary.json").write_text("{}")
    (run / "my_notes.txt").write_text("mine")
    claim_demo_dir(run, fresh=True)
    assert sorted(p.name for p in run.iterdir()) == sorted([OWNER, "my_notes.txt"])


def damage_truncated(run):
    path = run / "final" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return "final", r"HeaderTooLarge|SafetensorError|Error"


def damage_overwritten(run):
    from safetensors.torch import load_file, save_file

    path = run / "final" / "model.safetensors"
    weights = load_file(str(path))
    name = next(k for k in weights if k.endswith("wte.weight"))
    weights[name] = weights[name].clone().fill_(float("nan"))
    save_file(weights, str(path), metadata={"format": "pt"})
    return "final", r"holds non-finite policy weights"


def damage_state_missing(run):
    (run / "final" / "trainer_state.json").unlink()
    return "final", r"it has no trainer_state.json"


@pytest.mark.parametrize("damage", [damage_truncated, damage_overwritten, damage_state_missing],
                         ids=["truncated", "overwritten", "state missing"])
def test_a_damaged_newest_checkpoint_is_named_with_the_way_on_and_nothing_is_touched(tiny_dirs, tmp_path, capsys,
                                                                                    damage):
    run = tmp_path / "run"
    assert main(["ppo", *ppo_args(tiny_dirs, run, total_updates=2, save_every=1)]) == 0
    damaged, pattern = damage(run)
    before = snapshot(run)
    capsys.readouterr()
    assert main(["ppo", *ppo_args(tiny_dirs, run, total_updates=3, save_every=1, resume="true")]) == 2
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("tether: error:")]
    assert len(message) == 1 and "Traceback" not in err, err
    assert f"cannot resume from {run / damaged}" in message[0] and __import__("re").search(pattern, message[0])
    assert f"mv {run / damaged} {run / damaged}.damaged" in message[0]
    assert "resume again to continue from checkpoint-1" in message[0]
    assert snapshot(run) == before  # config.yaml, metrics and every checkpoint as they were
    (run / damaged).rename(run / f"{damaged}.damaged")  # the way on works
    assert main(["ppo", *ppo_args(tiny_dirs, run, total_updates=3, save_every=1, resume="true")]) == 0


def test_a_full_disk_while_checkpointing_names_the_checkpoint_frees_its_partial_copy_and_keeps_the_others(
        tiny_dirs, tmp_path, capsys, monkeypatch):
    import errno

    import tether.checkpoint as checkpoint

    run = tmp_path / "run"
    real_save = checkpoint.torch.save
    calls = []

    def disk_fills_at_the_second_checkpoint(obj, target, *args, **kwargs):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_fills_at_the_second_checkpoint)
    capsys.readouterr()
    assert main(["ppo", *ppo_args(tiny_dirs, run, total_updates=3, save_every=1)]) == 1
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("tether: error:")]
    assert len(message) == 1 and "Traceback" not in err, err
    assert f"could not write checkpoint {run / 'checkpoint-2'}: No space left on device" in message[0]
    assert "every earlier checkpoint is intact" in message[0] and "resume=true continues" in message[0]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]  # no checkpoint-2.tmp left
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert main(["ppo", *ppo_args(tiny_dirs, run, total_updates=3, save_every=1, resume="true")]) == 0


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_sigterm_stops_sft_and_reward_training_with_one_line_and_no_stale_lock(tiny_dirs, tmp_path, stage):
    import signal
    import time

    from tether.tiny import builtin_corpus

    run = tmp_path / "run"
    if stage == "sft":
        data = tmp_path / "text.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_corpus(200, seed=2)))
        args = [f"data={data}", "init=scratch", "vocab_size=256", "hidden=32", "layers=1", "heads=2", "block_size=32",
                "max_steps=100000", "eval_every=100000"]
    else:
        from test_reward import preference_rows

        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows()))
        args = [f"model={tiny_dirs['gpt2']}", f"data={data}", "epochs=100000", "eval_every=100000", "max_length=32"]
    process = subprocess.Popen([sys.executable, "-m", "tether", stage, *args, f"output_dir={run}", "progress=false",
                                "num_threads=1"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while not (run / "config.yaml").is_file():  # written once every check has passed: training is next
        assert time.time() < deadline and process.poll() is None, "the run never started"
        time.sleep(0.2)
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    message = [line for line in err.splitlines() if line.startswith("tether: error:")]
    assert len(message) == 1 and "stopped by SIGTERM" in message[0] and "Traceback" not in err, err
    assert not (run / ".tether.lock").exists()


def test_a_reference_with_fewer_embedding_rows_and_a_tokenizer_of_another_model_are_refused(
        tiny_dirs, earlier, tmp_path, capsys, other_vocab):
    from tether.tiny import build_tiny_causal_lm, builtin_corpus, train_tokenizer

    small = tmp_path / "small_vocab"  # weights only: no tokenizer files to compare
    model = build_tiny_causal_lm("gpt2", train_tokenizer(builtin_corpus(100, seed=3), vocab_size=256), seed=0,
                                 hidden=16, layers=1, heads=2)
    model.resize_token_embeddings(200)  # fewer rows than the policy's tokenizer has tokens
    model.save_pretrained(small)
    for overrides, pattern in (
            ({"reference": small}, r"reference .*small_vocab has \d+ embedding rows but the policy's tokenizer has "
                                   r"\d+ tokens; the reference must be a model of the policy's vocabulary"),
            ({"tokenizer": other_vocab}, r"tokenizer=.* has a different vocabulary than the policy .*unset tokenizer")):
        code, err = run_case({**overrides, "output_dir": "NEW"}, tiny_dirs, earlier, tmp_path, capsys)
        message = [line for line in err.splitlines() if line.startswith("tether: error:")]
        assert code == 2 and len(message) == 1 and __import__("re").search(pattern, message[0]), err
        assert "Traceback" not in err


def test_a_config_path_that_is_a_directory_is_named_as_one(tmp_path, capsys):
    capsys.readouterr()
    assert main(["ppo", "--config", str(tmp_path)]) == 2
    assert f"config file {tmp_path} is a directory; give the YAML file" in capsys.readouterr().err


def test_a_reward_function_that_never_returns_stops_the_run_with_a_checkpoint(tiny_dirs, tmp_path, capsys):
    hangs = tmp_path / "hangs.py"
    hangs.write_text("import threading\nCALLS = [0]\n\ndef score(responses):\n    CALLS[0] += 1\n"
                     "    if CALLS[0] == 2:\n        threading.Event().wait()  # never returns\n"
                     "    return [0.0] * len(responses)\n")
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["ppo", *ppo_args(tiny_dirs, run, reward_fn=f"{hangs}:score", total_updates=3,
                                  reward_timeout_s=2)]) == 1
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("tether: error:")]
    assert len(message) == 1 and "Traceback" not in err, err
    assert f"reward {hangs}:score did not return within reward_timeout_s=2 s while scoring 4 responses" in message[0]
    assert f"checkpoint {run / 'checkpoint-1'}" in message[0] and "resume=true" in message[0]


def test_a_lone_surrogate_and_a_chat_template_that_raises_name_their_record(tiny_dirs, tmp_path):
    import copy

    from tether.data import DataError, tokenize_prompts
    from tether.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_dirs["gpt2"]))
    with pytest.raises(DataError, match=r"p.jsonl: record 1: the tokenizer cannot encode its prompt .*lone surrogate"):
        tokenize_prompts([{"prompt": "fine"}, {"prompt": "cut emoji \ud83d"}], tokenizer, source="p.jsonl")
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['content'] }}"
                            "{% endfor %}")
    records = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "tool", "content": "x"}]}]
    with pytest.raises(DataError, match=r"p.jsonl: record 1: the chat template failed .*\['tool'\].*unknown role tool"):
        tokenize_prompts(records, strict, source="p.jsonl")


def test_an_interrupted_demo_says_to_rerun_it_not_to_resume(monkeypatch, tmp_path, capsys):
    import tether.cli as cli
    from tether.trainers.ppo import TrainingStopped

    def stopped(output_dir, fresh=False):
        reason = "stopped by SIGINT after update 3"  # as PPOTrainer._stop raises it
        raise TrainingStopped(f"{reason}; checkpoint {output_dir}/ppo/checkpoint-3; continue with the same command "
                              "plus resume=true", None, 130, reason=reason)

    monkeypatch.setattr(cli, "run_demo", stopped)
    capsys.readouterr()
    assert main(["demo", "--output-dir", str(tmp_path / "demo")]) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGINT after update 3; rerun the same `tether demo` command" in err and "resume=true" not in err
