"""``gmt-plugins finetune``: plain SFT vs GMT on a real model and data set, on CPU in minutes.

With no arguments it fine-tunes the embedded SmolLM2-135M-Instruct on the embedded GSM8K train split
(both from PyPI packages, see :mod:`gmt_plugins.finetune.assets`), then prints held-out answer losses
and writes ``results.json`` and ``loss_curves.png`` to ``--output_dir``. The flags are those of
``trl.SFTConfig``, ``GMTConfig``, ``trl.ModelConfig`` and the job's own
:class:`~gmt_plugins.finetune.arguments.FinetuneArguments`; ``--config FILE.yaml`` sets any of them.

Bad input is one line on stderr and exit status 2, before anything is loaded or trained. ``--help`` lists the
job's and GMT's flags without importing trl; ``--help-all`` lists every flag.
"""

from __future__ import annotations

import sys

from gmt_plugins.finetune import FinetuneError

PROG = "gmt-plugins finetune"
PROG_ERROR_STATUS = 2
EXTRA_MODULES = {"transformers", "accelerate", "matplotlib", "gguf", "peft", "safetensors", "trl", "yaml"}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the job; bad input prints one line on stderr and returns 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if _asks_short_help(argv):
        from gmt_plugins.finetune.arguments import make_help_parser

        make_help_parser(PROG).print_help()
        return 0
    try:
        from gmt_plugins.finetune.run import Job, run

        run(Job.from_argv(argv))
    except FinetuneError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return PROG_ERROR_STATUS
    except ModuleNotFoundError as err:
        if err.name not in EXTRA_MODULES:
            raise
        print(f'{PROG}: error: {err}; install the extra: pip install "gmt-plugins[finetune]"', file=sys.stderr)
        return PROG_ERROR_STATUS
    return 0


def _asks_short_help(argv: list[str]) -> bool:
    """``-h``/``--help`` (not ``--help-all``) before any ``--``: answered without importing trl."""
    flags = argv[: argv.index("--")] if "--" in argv else argv
    return any(a in ("-h", "--help") for a in flags) and "--help-all" not in flags


if __name__ == "__main__":
    sys.exit(main())
