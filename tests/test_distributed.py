"""PPO under torchrun on CPU (gloo): N ranks × batch B/N is the same update as 1 rank × batch B,
resume under 2 ranks is exact, and rank 0 alone writes the run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REWARDS

pytestmark = pytest.mark.slow  # two processes per test: most of the suite's time (make test-fast skips it)

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parents[1]
NCCL_LIKE = Path(__file__).with_name("nccl_like")  # its sitecustomize makes every rank run as on CUDA + NCCL


def launch(ranks: int, args: list[str], nccl_like: bool = False) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=ranks ARGS` on CPU, one thread per rank. nccl_like: the
    process group is initialised as for CUDA GPUs and, like NCCL, refuses CPU tensors unless tether
    gave it a backend for them (tests/nccl_like/sitecustomize.py)."""
    path = os.pathsep.join([str(NCCL_LIKE)] * nccl_like + [str(ROOT)])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           *args], capture_output=True, text=True, env=env, timeout=600)


def succeeded(out: subprocess.CompletedProcess) -> None:
    first = max(out.stderr.find("Traceback"), 0)  # a rank's own error, before torchrun's summary
    assert out.returncode == 0, out.stderr[first : first + 4000] + "\n...\n" + out.stderr[-1500:]


def torchrun(ranks: int, values: dict, nccl_like: bool = False) -> None:
    """A PPO run of tests/dist_worker.py with these config values."""
    succeeded(launch(ranks, [str(WORKER), json.dumps(values)], nccl_like))


def torchrun_stage(ranks: int, stage: str, args: dict, nccl_like: bool = False) -> None:
    """`torchrun ... -m tether STAGE key=value ...`, the command a user types."""
    succeeded(launch(ranks, ["-m", "tether", stage, *[f"{k}={v}" for k, v in args.items()]], nccl_like))


def assert_same_metrics_and_files(one: Path, two: Path) -> None:
    """Every logged value of run `two` equals run `one`'s (times aside), one line per step (rank 0
    alone wrote), and the two run directories hold the same files."""
    rows1, rows2 = metrics(one), metrics(two)
    assert len(rows2) == len(rows1)
    for m1, m2 in zip(rows1, rows2, strict=True):
        for key, value in m1.items():
            if not key.startswith("time/"):
                assert m2[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    listing = sorted(str(p.relative_to(two)) for p in two.rglob("*"))
    assert listing == sorted(str(p.relative_to(one)) for p in one.rglob("*"))


def run_values(tiny_dirs, out: Path, **extra) -> dict:
    values = dict(policy=str(tiny_dirs["gpt2"]), prompts=str(tiny_dirs["prompts"]),
                  reward_fn=f"{REWARDS}:letter_o_rate", output_dir=str(out), total_updates=2, batch_size=8,
                  num_minibatches=1, ppo_epochs=2, max_new_tokens=8, learning_rate=1e-3, progress=False, seed=0,
                  normalize_scores=True, adaptive_kl=True, kl_target=0.5, kl_horizon=10, sample_every=1)
    values.update(extra)
    return values


def weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    found = {}
    for path in sorted(final.rglob("*.safetensors")):
        found.update({f"{path.relative_to(final)}:{k}": v for k, v in load_file(str(path)).items()})
    assert found, f"no weights under {final}"
    return found


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


PLACEMENTS = {
    # full models, a reward model (FSDP2 shards it with the reference); one micro-batch: the first
    # step reuses the rollout's graph
    "separate": dict(placement="separate", reward_model="REWARD_MODEL", reward_fn=None),
    # LoRA on one base; two micro-batches per minibatch: token counts summed over ranks and micro-batches
    "shared_base": dict(placement="shared_base", lora_rank=4, lora_alpha=8.0, gradient_accumulation_steps=2),
    # no critic; 4 prompts x 2 samples, shared by prompt (a group never straddles ranks); a mean per response
    "critic_free_groups": dict(advantage_estimator="reinforce_pp", samples_per_prompt=2, batch_size=4,
                               loss_aggregation="seq_mean_token_mean"),
}


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_two_ranks_with_half_the_batch_each_make_the_same_update_as_one_rank(tiny_dirs, tmp_path, placement):
    """For data parallelism (whole models) and FSDP2 (sharded blocks, frozen roles sharded too)."""
    runs = {}
    for name, ranks, extra in (("one", 1, {}), ("ddp", 2, {"data_parallel": "ddp"}),
                               ("fsdp2", 2, {"data_parallel": "fsdp2", "fsdp_frozen": "shard"})):
        runs[name] = tmp_path / name
        values = {k: str(tiny_dirs["reward"]) if v == "REWARD_MODEL" else v for k, v in PLACEMENTS[placement].items()}
        torchrun(ranks, run_values(tiny_dirs, runs[name], fixed_responses=True, **values, **extra))
    layout = {name: json.loads((run / "layout.json").read_text()) for name, run in runs.items()}
    assert layout["one"] == layout["ddp"] == {"units": 0, "local_share": 1.0}
    assert layout["fsdp2"]["units"] > 0 and layout["fsdp2"]["local_share"] < 0.6  # really sharded
    one = weights(runs["one"])
    start = weights_at_start(tiny_dirs, placement)
    if start is not None:  # the update did something: equality is not two untouched copies
        assert not torch.equal(start, one[next(k for k in one if k.endswith("wte.weight"))])
    for name in ("ddp", "fsdp2"):
        two = weights(runs[name])
        assert one.keys() == two.keys(), name
        for key in one:
            assert torch.allclose(one[key], two[key], atol=1e-5, rtol=0), (name, key)
        for m1, m2 in zip(metrics(runs["one"]), metrics(runs[name]), strict=True):
            # A clip fraction counts tokens on either side of a threshold: float rounding in a
            # different summation order may move one token across it.
            one_token = 1.0 / (m1["response/length"] * 8)
            for key, value in m1.items():
                if key.startswith("time/"):
                    continue
                tolerance = one_token + 1e-6 if key.endswith("clipfrac") else 1e-5
                assert m2[key] == pytest.approx(value, rel=1e-4, abs=tolerance), (name, key)
        assert "generation/logprob_gap" in metrics(runs[name])[0]
    for run in runs.values():  # the stand-in engine was told about every update (and the start)
        assert json.loads((run / "syncs.json").read_text()) == {"syncs": 3, "updates": 2}


def weights_at_start(tiny_dirs, placement):
    if placement != "separate":
        return None
    return load_file(str(Path(tiny_dirs["gpt2"]) / "model.safetensors"))["transformer.wte.weight"]


@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp2"])
def test_resume_under_two_ranks_is_exact_and_rank_zero_alone_writes(tiny_dirs, tmp_path, data_parallel):
    """The built-in sampler (under FSDP2 from gathered weights), gathered checkpoints, exact resume."""
    straight, resumed, single = tmp_path / "straight", tmp_path / "resumed", tmp_path / "single"
    common = dict(total_updates=3, ptx_data=None, data_parallel=data_parallel, fsdp_frozen="replicate")
    torchrun(2, run_values(tiny_dirs, straight, **common))
    torchrun(2, run_values(tiny_dirs, resumed, save_every=2, stop_after=2, **common))
    torchrun(2, run_values(tiny_dirs, resumed, save_every=2, resume=True, **common))
    a, b = weights(straight), weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [{k: v for k, v in m.items() if not k.startswith("time/")} for m in metrics(straight)] == \
           [{k: v for k, v in m.items() if not k.startswith("time/")} for m in metrics(resumed)]
    assert (resumed / "checkpoint-2").is_dir()
    # Rank 0 alone wrote: one metrics line per update, and the same files as a one-process run.
    assert len(metrics(straight)) == 3
    if data_parallel == "fsdp2":  # the listing below is the same code path for both
        return
    torchrun(1, run_values(tiny_dirs, single, **common))
    listing = sorted(str(p.relative_to(straight)) for p in straight.rglob("*"))
    assert listing == sorted(str(p.relative_to(single)) for p in single.rglob("*"))


def test_a_batch_that_does_not_split_into_equal_shares_is_refused(tiny_dirs, tmp_path):
    out = launch(2, [str(WORKER), json.dumps(run_values(tiny_dirs, tmp_path / "odd", batch_size=5, num_minibatches=1))])
    assert out.returncode != 0
    assert "does not split into 2 equal shares" in out.stderr
    assert not (tmp_path / "odd").exists()


@pytest.mark.parametrize("layout", ["text", "prompt_completion"])
def test_sft_on_two_ranks_makes_the_same_steps_as_one_rank(tmp_path, layout):
    """`torchrun -m tether sft`: each rank trains on half of every batch (dropout off, so both runs draw
    nothing at random after the start); weights and losses match one process, rank 0 alone writes.
    With prompt-completion data the loss counts the completions only (loss_on=completion): the
    token count that normalises it is the whole batch's, so the ranks still sum to one process."""
    from tether.tiny import builtin_corpus

    data = tmp_path / "text.jsonl"
    texts = builtin_corpus(120, seed=2)
    rows = ([{"text": t} for t in texts] if layout == "text" else
            [{"prompt": " ".join(t.split()[:3]) + " ", "completion": " ".join(t.split()[3:])} for t in texts])
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    runs = {}
    for ranks in (1, 2):
        runs[ranks] = tmp_path / f"sft{ranks}"
        args = dict(data=data, output_dir=runs[ranks], init="scratch", vocab_size=256, hidden=32, layers=1, heads=2,
                    block_size=32, batch_size=8, gradient_accumulation_steps=2, max_steps=6, learning_rate=3e-3,
                    eval_every=3, eval_fraction=0.1, progress="false", seed=0, dropout=0.0, save_every=3)
        torchrun_stage(ranks, "sft", args)
    one, two = weights(runs[1]), weights(runs[2])
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=0), key
    assert_same_metrics_and_files(runs[1], runs[2])


def test_reward_training_on_two_ranks_makes_the_same_steps_as_one_rank(tiny_dirs, tmp_path):
    """`torchrun -m tether reward`: each rank scores half of every batch of pairs; the pairwise loss
    is divided by the whole batch's pairs and the gradients summed, so the steps match one process."""
    from test_reward import preference_rows

    rows = preference_rows()
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:36]))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows[36:]))
    runs = {}
    for ranks in (1, 2):
        runs[ranks] = tmp_path / f"reward{ranks}"
        args = dict(model=tiny_dirs["gpt2"], data=train, eval_data=held_out, output_dir=runs[ranks], batch_size=8,
                    gradient_accumulation_steps=2, epochs=1.0, learning_rate=3e-3, max_length=64, eval_every=2,
                    save_every=2, progress="false", seed=0)
        torchrun_stage(ranks, "reward", args)
    one, two = weights(runs[1]), weights(runs[2])
    assert one.keys() == two.keys()
    # The final norm's bias shifts chosen and rejected scores alike: its gradient is zero, exactly so
    # in one process; the two-rank sum leaves float residue that Adam turns into steps of up to lr.
    start = load_file(str(Path(tiny_dirs["gpt2"]) / "model.safetensors"))
    untouched = {k for k in one if k.split(":")[1] in start and torch.equal(one[k], start[k.split(":")[1]])}
    assert untouched == {"model.safetensors:transformer.ln_f.bias"}
    for key in one:
        tolerance = 3e-3 * 5 if key in untouched else 1e-5
        assert torch.allclose(one[key], two[key], atol=tolerance, rtol=0), key
    assert len(metrics(runs[1])) == 5  # 36 pairs / 8 per step
    assert_same_metrics_and_files(runs[1], runs[2])


def test_sft_under_two_ranks_reduces_its_scalars_when_the_group_is_initialised_for_cuda(tmp_path):
    """As on GPUs, where the group's NCCL backend serves CUDA tensors only: SFT's CPU scalars and
    objects still have a backend (PPO: test_fsdp2_under_bf16_mixed_..., which runs the same way)."""
    from tether.tiny import builtin_corpus

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_corpus(60, seed=2)))
    torchrun_stage(2, "sft", dict(data=data, output_dir=tmp_path / "sft", init="scratch", vocab_size=256, hidden=32,
                                  layers=1, heads=2, block_size=32, batch_size=8, max_steps=2, eval_every=2,
                                  save_every=1, progress="false"), nccl_like=True)
    assert (tmp_path / "sft" / "final").is_dir() and (tmp_path / "sft" / "checkpoint-1").is_dir()


def test_the_nccl_like_group_refuses_cpu_tensors_unless_given_a_cpu_backend(tmp_path):
    """The stand-in behaves as NCCL does: plain "nccl" serves no CPU tensor (what tether asked for
    before), tether's spec does."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from tether import distributed\n"
        "for spec in ('nccl', distributed.backend_spec('cuda')):\n"
        "    dist.init_process_group(spec)\n"
        "    try:\n"
        "        dist.all_reduce(torch.ones(1)); said = f'{spec} ok'\n"
        "    except RuntimeError as err:\n"
        "        said = f'{spec} refused: {err}'\n"
        "    if dist.get_rank() == 0:\n"
        "        print(said, flush=True)\n"
        "    dist.destroy_process_group()\n")
    out = launch(2, [str(script)], nccl_like=True)
    succeeded(out)
    assert "nccl refused: No backend type associated with device type cpu" in out.stdout
    assert "cpu:gloo,cuda:nccl ok" in out.stdout


@pytest.mark.parametrize("placement", ["separate", "shared_base"])
def test_fsdp2_under_bf16_mixed_makes_the_update_of_one_process(tiny_dirs, tmp_path, placement):
    """FSDP2 with MixedPrecisionPolicy (bf16 gathers, fp32 reduction) against one process under bf16
    autocast: the same update within bf16 rounding, fp32 weights written. The two ranks run as on
    GPUs, in a process group that (like NCCL) refuses CPU tensors without a CPU backend: every
    collective of PPO, FSDP2 and the checkpoints (save_every=1) must find one."""
    runs = {}
    for name, ranks in (("one", 1), ("fsdp2", 2)):
        runs[name] = tmp_path / name
        values = {k: str(tiny_dirs["reward"]) if v == "REWARD_MODEL" else v for k, v in PLACEMENTS[placement].items()}
        torchrun(ranks, run_values(tiny_dirs, runs[name], fixed_responses=True, precision="bf16-mixed", save_every=1,
                                   data_parallel="fsdp2", fsdp_frozen="shard", **values), nccl_like=ranks > 1)
    one, two = weights(runs["one"]), weights(runs["fsdp2"])
    assert one.keys() == two.keys()
    for key in one:
        assert one[key].dtype == torch.float32, key
        assert torch.allclose(one[key], two[key], atol=2e-3, rtol=0), (key, (one[key] - two[key]).abs().max())
    for m1, m2 in zip(metrics(runs["one"]), metrics(runs["fsdp2"]), strict=True):
        for key in ("reward/score", "kl/mean", "policy/loss"):
            assert m2[key] == pytest.approx(m1[key], rel=0.05, abs=0.01), key
