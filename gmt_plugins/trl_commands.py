"""``gmt-plugins sft|dpo|grpo|kto|rloo|reward``: TRL's own training scripts with Gradient-Mask Tuning switched on.

``gmt-plugins sft --config x.yaml`` behaves as ``trl sft --config x.yaml`` with :class:`~gmt_plugins.config.GMTConfig`'s
fields added to the same YAML file and command line:

* the flags are those of TRL's script (its dataclasses, taken from ``trl.scripts.<name>.make_parser``) plus
  GMTConfig's, on one ``TrlParser``; YAML keys and flags that none of them knows go to ``accelerate launch``
  (``num_processes: 2``, ``--accelerate_config zero2``), exactly as ``trl <name>`` sends them;
* the command parses and validates everything first (``--help`` and a bad value stop here, before any launch),
  then starts ``accelerate launch -m gmt_plugins.trl_commands <name> ...``, one process per device;
* each process runs TRL's own ``trl.scripts.<name>.main``. That function builds its trainer without a
  ``callbacks`` argument, so while it runs, the trainer class it imports from ``trl`` is replaced by a function
  that builds the same class with a :class:`~gmt_plugins.GMTCallback` added (and placed before the ``report_to``
  integrations). The script is not copied: its data loading, model loading, saving and Hub push stay TRL's.

Started by a launcher already (``accelerate launch -m gmt_plugins.cli sft ...``, ``torchrun``), the command trains
in the process it is in.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

logger = logging.getLogger(__name__)

TRAINERS: dict[str, str] = {
    "sft": "SFTTrainer",
    "dpo": "DPOTrainer",
    "grpo": "GRPOTrainer",
    "kto": "KTOTrainer",
    "rloo": "RLOOTrainer",
    "reward": "RewardTrainer",
}
"""The commands, each named as TRL's, and the ``trl`` trainer class its script builds."""

PROG_ERROR_STATUS = 2
WORKER_MODULE = "gmt_plugins.trl_commands"
# Set by every accelerate launcher (simple, multi-GPU, DeepSpeed) in the processes it starts; LOCAL_RANK by torchrun.
LAUNCHED_ENV = ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK")


class CommandError(Exception):
    """Bad input to a command: printed as one line on stderr, exit status 2."""


def prog(name: str) -> str:
    return f"gmt-plugins {name}"


def make_parser(name: str) -> Any:
    """A ``TrlParser`` over the dataclasses of ``trl.scripts.<name>`` followed by ``GMTConfig``.

    The dataclasses are read from TRL's own ``make_parser``, so a field TRL adds to its script is a flag here too.
    """
    from trl import TrlParser

    from gmt_plugins.config import GMTConfig

    script = trl_script(name)
    dataclass_types = (*script.make_parser(prog=prog(name)).dataclass_types, GMTConfig)

    class Parser(TrlParser):
        def error(self, message: str):  # one line, no usage block (argparse would print the whole flag list)
            raise CommandError(message)

    parser = Parser(
        dataclass_types, prog=prog(name),
        description=f"`trl {name}` with Gradient-Mask Tuning: TRL's {name} script, its flags and --config YAML keys, "
        "plus GMTConfig's (--mask_ratio, --scope, --strategy, ...). Keys and flags none of them knows go to "
        "`accelerate launch`, as with `trl`.",
    )
    # TrlParser reads --config itself before argparse runs; declared here so that --help shows it.
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file whose keys are any of the flags below")
    return parser


def trl_script(name: str) -> Any:
    if name not in TRAINERS:
        raise CommandError(f"unknown command {name!r}; choose from {', '.join(TRAINERS)}")
    return importlib.import_module(f"trl.scripts.{name}")


def parse(name: str, argv: Sequence[str]) -> tuple[tuple[Any, ...], Any, list[str], list[str]]:
    """``(trl_args, gmt_config, config_remaining, cli_remaining)``: TRL's dataclasses (in its ``main``'s order),
    the ``GMTConfig``, and the YAML keys and flags no dataclass took (meant for ``accelerate launch``).

    A value a dataclass refuses (``GMTConfig``'s ``ValueError`` names the field) is a :class:`CommandError`.
    """
    parser = make_parser(name)
    try:
        *parsed, config_remaining, cli_remaining = parser.parse_args_and_config(
            list(argv), return_remaining_strings=True, separate_remaining_strings=True
        )
    except FileNotFoundError as err:
        raise CommandError(f"--config: file not found: {err.filename}") from None
    except ValueError as err:
        raise CommandError(str(err)) from None
    # After the dataclasses comes a Namespace holding --config (no dataclass field), already applied.
    *trl_args, gmt_config = parsed[: len(parser.dataclass_types)]
    return tuple(trl_args), gmt_config, config_remaining, cli_remaining


def make_callback(gmt_config: Any) -> Any:
    """The ``GMTCallback``; built before any launch so that an unknown strategy fails here."""
    from gmt_plugins.integrations.transformers import GMTCallback

    try:
        return GMTCallback(config=gmt_config)
    except ValueError as err:
        raise CommandError(str(err)) from None


@contextlib.contextmanager
def trainer_with_callback(name: str, callback: Any) -> Iterator[list[Any]]:
    """While open, ``trl.<Trainer>`` (and the script module's own global of that name, if any) builds the real
    TRL class with ``callback`` added; yields the list of trainers built.

    Why a patch: ``trl.scripts.<name>.main`` imports the class from ``trl`` inside the function and calls it
    without ``callbacks``, and it has no other way in. Patching the name it imports keeps TRL's script whole;
    the trainer built is exactly TRL's class.
    """
    import trl

    from gmt_plugins.integrations.transformers import place_before_reporters

    class_name = TRAINERS[name]
    script = trl_script(name)
    if class_name not in script.main.__code__.co_names:
        raise RuntimeError(
            f"trl.scripts.{name}.main does not build {class_name} by name; this version of TRL's script cannot be "
            f"given a GMTCallback by {prog(name)}"
        )
    trainer_class = getattr(trl, class_name)
    built: list[Any] = []

    def build(*args: Any, callbacks: list[Any] | None = None, **kwargs: Any) -> Any:
        trainer = trainer_class(*args, callbacks=[*(callbacks or []), callback], **kwargs)
        place_before_reporters(trainer)  # TRL configs often set report_to; those integrations see gmt/* too
        built.append(trainer)
        return trainer

    patched = [module for module in (trl, script) if getattr(module, class_name, None) is trainer_class]
    for module in patched:
        setattr(module, class_name, build)
    try:
        yield built
    finally:
        for module in patched:
            setattr(module, class_name, trainer_class)


def train(name: str, argv: Sequence[str], *, launched: bool = True) -> Any:
    """Run TRL's ``trl.scripts.<name>.main`` in this process with a ``GMTCallback`` in its trainer; return the trainer.

    ``launched``: started by :func:`launch`, whose ``accelerate launch`` used the leftover keys and flags; otherwise
    they are reported as unused.
    """
    trl_args, gmt_config, config_remaining, cli_remaining = parse(name, argv)
    leftover = config_remaining + cli_remaining
    if leftover and not launched:
        logger.warning(
            "%s: %s are no field of TRL's %s script nor of GMTConfig; in a process already started by a launcher they "
            "are not used (`%s` passes them to accelerate launch)", prog(name), leftover, name, prog(name),
        )
    callback = make_callback(gmt_config)
    with trainer_with_callback(name, callback) as built:
        trl_script(name).main(*trl_args)
    if len(built) != 1:
        raise RuntimeError(f"trl.scripts.{name}.main built {len(built)} trainers; expected one, with GMT")
    return built[0]


def launch(name: str, argv: Sequence[str]) -> int:
    """As ``trl <name>``: check the arguments here, then ``accelerate launch -m gmt_plugins.trl_commands <name>``."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    _, gmt_config, config_remaining, cli_remaining = parse(name, argv)
    make_callback(gmt_config)
    try:
        launch_args = resolve_accelerate_config_argument(config_remaining + cli_remaining)
    except ValueError as err:
        raise CommandError(str(err)) from None
    script_args = subtract_subsequence(list(argv), cli_remaining)
    accelerate_args = launch_command_parser().parse_args([*launch_args, "--module", WORKER_MODULE, name, *script_args])
    try:
        launch_command(accelerate_args)
    except subprocess.CalledProcessError as err:
        print(f"{prog(name)}: training exited with status {err.returncode}", file=sys.stderr)
        return err.returncode or 1
    return 0


def subtract_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """``items`` without the ordered ``subsequence`` (the flags meant for ``accelerate launch``).

    The same rule as ``trl.cli.commands.training._subtract_subsequence``, written out because that one is private.
    """
    rest, pending = [], iter(subsequence)
    current = next(pending, None)
    for item in items:
        if current is not None and item == current:
            current = next(pending, None)
        else:
            rest.append(item)
    return rest


def under_launcher() -> bool:
    return any(var in os.environ for var in LAUNCHED_ENV)


def main(name: str, argv: Sequence[str]) -> int:
    """``gmt-plugins <name> ARGV``: launch, or train here when a launcher started this process."""
    try:
        if under_launcher():
            train(name, argv, launched=False)
            return 0
        return launch(name, argv)
    except CommandError as err:
        print(f"{prog(name)}: error: {err}", file=sys.stderr)
        return PROG_ERROR_STATUS


def worker(argv: Sequence[str]) -> int:
    """``python -m gmt_plugins.trl_commands <name> ARGV``: what each launched process runs."""
    if not argv:
        print(f"usage: python -m {WORKER_MODULE} {{{','.join(TRAINERS)}}} [flags]", file=sys.stderr)
        return PROG_ERROR_STATUS
    name, *rest = argv
    try:
        train(name, rest, launched=True)
    except CommandError as err:
        print(f"{prog(name)}: error: {err}", file=sys.stderr)
        return PROG_ERROR_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
