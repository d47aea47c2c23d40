"""``gmt-plugins``: inspect the plugin system (``list``) and run the fine-tuning job (``finetune``)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import shutil
import sys
import textwrap
import types
from collections.abc import Sequence

from gmt_plugins.plugins import get_plugin_manager, strategy_registry
from gmt_plugins.registry import option_defaults

PROG_ERROR_STATUS = 2
TRL_COMMANDS = ("sft", "dpo", "grpo", "kto", "rloo", "reward")  # gmt_plugins.trl_commands.TRAINERS, without importing trl


def one_line_error(self: argparse.ArgumentParser, message: str) -> None:
    self.exit(PROG_ERROR_STATUS, f"{self.prog}: error: {message}\n")


def list_plugins(width: int | None = None) -> str:
    """Registered strategies (class, summary, options with defaults) and loaded plugins with their hooks,
    wrapped at word boundaries to ``width`` columns (default: the terminal's, at most 100)."""
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 100)
    pm = get_plugin_manager()
    lines = ["strategies:"]
    for name, cls in strategy_registry(pm):
        lines.append(f"  {name}  {cls.__module__}.{cls.__qualname__}")
        lines += _wrapped(_summary(cls), width, "      ")
        lines += _wrapped(f"strategy_options (defaults): {_options_line(cls)}", width, "      ", "        ")
    lines.append("plugins:")
    for plugin_name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        lines.append(f"  {plugin_name}")
        lines += _wrapped(f"hooks: {', '.join(hooks) if hooks else '(none)'}", width, "    ", "           ")
    return "\n".join(lines)


def _summary(cls: type) -> str:
    """The first paragraph of ``cls``'s docstring as one line (docstrings wrap mid-sentence)."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    return " ".join(doc.split("\n\n", 1)[0].split()) or "(no description)"


def _options_line(cls: type) -> str:
    """The options with their defaults as the JSON object ``--strategy_options`` takes."""
    defaults = option_defaults(cls)
    if not defaults:
        return "none"
    return json.dumps({k: "<required>" if v is dataclasses.MISSING else v for k, v in defaults.items()}, default=str)


def _wrapped(text: str, width: int, indent: str, subsequent: str | None = None) -> list[str]:
    return textwrap.wrap(
        text, width=width, initial_indent=indent, subsequent_indent=subsequent or indent, break_long_words=False,
        break_on_hyphens=False,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["finetune"]:
        # Its own TrlParser (every SFTConfig/GMTConfig/ModelConfig field, --config); imported only here.
        from gmt_plugins.finetune.cli import main as finetune_main

        return finetune_main(args[1:])
    if args[:1] and args[0] in TRL_COMMANDS:
        # TRL's own script for that command, with GMTConfig's fields on its parser; imported only here.
        from gmt_plugins.trl_commands import main as trl_command_main

        return trl_command_main(args[0], args[1:])
    parser = argparse.ArgumentParser(prog="gmt-plugins", description="Gradient-Mask Tuning for the Hugging Face stack")
    parser.error = types.MethodType(one_line_error, parser)  # one line on stderr, exit 2, like the subcommands
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered strategies with their options and defaults, loaded plugins and the hooks each implements")
    sub.add_parser(
        "finetune", add_help=False,
        help="plain SFT vs Gradient-Mask Tuning side by side (default: SmolLM2-135M on GSM8K, CPU, minutes); "
        "see gmt-plugins finetune --help",
    )
    for name in TRL_COMMANDS:
        sub.add_parser(name, add_help=False, help=f"`trl {name}` with GMTConfig's flags and YAML keys; see gmt-plugins {name} --help")
    parsed = parser.parse_args(args)
    if parsed.command == "list":
        print(list_plugins())
    return 0


if __name__ == "__main__":
    sys.exit(main())
