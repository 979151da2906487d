"""`nanoseek train`: pretrain a model. Every TrainConfig field is a flag (`--batch-size`),
and can also sit in a TOML/YAML file given with `--config`; flags win over the file, and on
`--resume` both sit on top of the run's saved settings."""

from __future__ import annotations

import argparse
import dataclasses
import typing


def _flag_type(tp: object):
    """int | None -> int, float -> float, ... (argparse wants one callable)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return {"int": int, "float": float, "str": str, "bool": bool}.get(
        getattr(base, "__name__", ""), str
    )


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.train.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="pretrain a model (MLA + DeepSeekMoE + MTP) on token shards or a corpus",
        description="Pretrain a model. Budget with --steps, --tokens or --minutes (first one "
        "reached stops the run). Example: nanoseek train --preset small --data stdlib "
        "--out runs/small --minutes 5",
    )
    p.add_argument("--config", default=None, help="TOML or YAML file with the settings below")
    add_config_flags(p, TrainConfig, skip=("model",))  # a table: only from the config file
    p.set_defaults(func=run_train)


def add_config_flags(
    p: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), positional: str = ""
) -> None:
    """One flag per field of the config dataclass `cls` (`batch_size` -> `--batch-size`), its
    help from the field's metadata; every flag defaults to None (= not given). `positional`:
    a field taken as the positional argument instead."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:  # not init: internal
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if f.name == positional:  # optional, so that `--resume` needs only --out
            p.add_argument(f.name, nargs="?", default=None, metavar=f.name.upper(), help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{help_text} (default: {default})"
        if hints[f.name] is bool or hints[f.name] == bool | None:
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            p.add_argument(flag, type=_flag_type(hints[f.name]), default=None, help=help_text)


def run_train(args: argparse.Namespace) -> int:
    from nanoseek.train import make_config, train

    # every flag defaults to None, so what is left is what was given (--resume needs to know)
    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config")}
    tc = make_config(args.config, **given)
    train(tc)
    return 0
