"""Command line: `tether ppo --config FILE [key=value ...]`, `tether demo`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tether.config import ConfigError, PPOConfig, describe_options, load_config


def _ppo(args: argparse.Namespace) -> int:
    from tether.pipelines.ppo import run_ppo

    cfg = load_config(PPOConfig, args.config, args.overrides)
    metrics = run_ppo(cfg)
    print(f"done: {cfg.total_updates} updates, final score {metrics.get('reward/score', float('nan')):.4f}, "
          f"KL {metrics.get('kl/mean', float('nan')):.3f}; run directory {cfg.output_dir}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tether.pipelines.tiny_demo import run_tiny_demo

    run_tiny_demo(args.output_dir, fresh=args.fresh)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether", description="RLHF with PPO for Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    ppo = sub.add_parser(
        "ppo", help="PPO fine-tuning of a policy against a reward model or function.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Options go in a YAML file (--config) and/or as key=value overrides, which win.",
        epilog="options (key=default  [type]):\n" + describe_options(PPOConfig))
    ppo.add_argument("--config", help="YAML file of options.")
    ppo.add_argument("overrides", nargs="*", metavar="key=value", help="Options overriding the YAML file.")
    ppo.set_defaults(run=_ppo)
    demo = sub.add_parser("demo", help="A small offline PPO run on CPU that shows the score rising.")
    demo.add_argument("--output-dir", default="runs/demo", help="Where the demo writes its run (default runs/demo).")
    demo.add_argument("--fresh", action="store_true", help="Recompute every stage instead of reusing cached ones.")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "huggingface_hub", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as err:
        print(f"tether: config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"tether: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
