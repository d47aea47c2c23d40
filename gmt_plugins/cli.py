"""``gmt-plugins``: inspect the plugin system."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gmt_plugins.plugins import get_plugin_manager, strategy_registry


def list_plugins() -> str:
    pm = get_plugin_manager()
    lines = ["strategies:"]
    for name, cls in strategy_registry(pm):
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines.append(f"  {name:<12} {cls.__module__}.{cls.__qualname__}  {summary}")
    lines.append("plugins:")
    for plugin_name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        lines.append(f"  {plugin_name}")
        lines.append(f"    hooks: {', '.join(hooks) if hooks else '(none)'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import types

    from gmt_plugins.finetune.cli import one_line_error

    parser = argparse.ArgumentParser(prog="gmt-plugins", description="Gradient-Mask Tuning for the Hugging Face stack")
    parser.error = types.MethodType(one_line_error, parser)  # one line on stderr, exit 2, like the subcommands
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered strategies, loaded plugins and the hooks each implements")
    from gmt_plugins.finetune.cli import add_finetune_parser, run_finetune

    add_finetune_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "finetune":
        return run_finetune(args)
    if args.command == "list":
        print(list_plugins())
    return 0


if __name__ == "__main__":
    sys.exit(main())
