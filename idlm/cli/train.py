"""`idlm train CONFIG.yaml [--key value ...]`; under torchrun every rank runs it (DDP or FSDP)."""

import argparse
import os


def add_parsers(sub) -> None:
    train = sub.add_parser("train", help="convert an AR model to an I-DLM, or train a gated-LoRA (R-ISD) adapter",
                           description="Train from a YAML config; any config key can be overridden with "
                                       "--key value (e.g. --lr 3e-4 --mode lora). Under torchrun it runs DDP.")
    train.add_argument("config", help="training config YAML (see configs/ for examples)")
    # the --key value pairs argparse does not know land here (see main)
    train.set_defaults(run=run, overrides=[])


def run(args: argparse.Namespace) -> None:
    from idlm.training.config import load_train_config
    from idlm.training.trainer import Trainer

    final = Trainer(load_train_config(args.config, args.overrides)).train()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final checkpoint: {final}")
