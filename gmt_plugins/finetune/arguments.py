"""The arguments of ``gmt-plugins finetune``: four dataclasses on one ``TrlParser``, as TRL's scripts do.

* :class:`FinetuneArguments`: the job's own script arguments (data files, methods, evaluation, report);
* ``trl.SFTConfig``: every ``TrainingArguments`` field plus TRL's SFT fields;
* :class:`~gmt_plugins.config.GMTConfig`: the masking;
* ``trl.ModelConfig``: the model, its dtype, LoRA and quantization.

Every field is a flag (``--mask_ratio``, also spelled ``--mask-ratio``) and a key of the YAML file
given with ``--config``; flags on the command line override the file. :data:`JOB_DEFAULTS` are the
job's defaults where they differ from the dataclasses' own (a short CPU run in fp32, logged every step).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gmt_plugins.finetune import FinetuneError

# name -> (GMTConfig overrides or None for no masking, force LoRA)
METHODS: dict[str, tuple[dict[str, Any] | None, bool]] = {
    "sft": (None, False),
    "gmt": ({}, False),
    "gmt-tensor": ({"scope": "tensor", "strategy": "gmt"}, False),
    "gmt-global": ({"scope": "global", "strategy": "gmt"}, False),
    "random": ({"strategy": "random"}, False),
    "lora": (None, True),
}

# Values of SFTConfig, GMTConfig and ModelConfig fields that this job uses unless the command line or
# the YAML file says otherwise (they reproduce the job as it ran before it took TRL's arguments).
JOB_DEFAULTS: dict[str, Any] = {
    # SFTConfig / TrainingArguments
    "output_dir": "gmt-finetune-output",
    "max_steps": 20,
    "learning_rate": 3e-5,
    "lr_scheduler_type": "constant",
    "optim": "adamw_torch",
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 2,
    "max_length": 128,
    "logging_steps": 1,
    "save_strategy": "no",
    "seed": 0,
    "bf16": False,
    "gradient_checkpointing": None,  # SFTConfig's True would override activation_checkpointing (default off)
    "disable_tqdm": False,
    "remove_unused_columns": False,
    "report_to": "none",
    # GMTConfig: per-tensor fractions feed results.json's layer_fractions; per-layer statistics (with the
    # bit-per-entry coverage state) feed the plot's heatmaps (gmt_plugins.finetune.report.heatmap_quantities);
    # the energy kept (overall and per layer) goes to the log history and layer_stats
    "log_per_tensor": True,
    "track_coverage": True,
    "track_energy": True,
    "log_layers": True,
    # ModelConfig
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_target_modules": ["all-linear"],
}

# SFTConfig fields that configure SFTTrainer's own data pipeline or loss. This job tokenizes with
# answer-only labels itself (gmt_plugins.finetune.data) and trains with the plain Trainer, so a value
# other than the default is an error rather than silently ignored.
UNSUPPORTED_SFT_FIELDS = (
    "dataset_text_field", "dataset_kwargs", "dataset_num_proc", "packing", "packing_strategy", "padding_free",
    "pad_to_multiple_of", "eval_packing", "completion_only_loss", "assistant_only_loss", "loss_type",
    "activation_offloading", "chat_template_path", "shuffle_dataset", "truncation_mode", "router_aux_loss_coef",
    "eos_token", "pad_token",
)
# ModelConfig fields that only mean something for a model on the Hub; this job loads local folders.
UNSUPPORTED_MODEL_FIELDS = ("model_revision",)


@dataclass
class FinetuneArguments:
    """Script arguments of ``gmt-plugins finetune`` (the model folder is ``--model_name_or_path``)."""

    _argument_group_name: ClassVar[str] = "the job"  # HfArgumentParser's help group

    dataset_path: str | None = field(
        default=None,
        metadata={"help": "Local JSONL with question/answer, prompt/completion or text columns "
                          "(default: the embedded GSM8K train split)."},
    )
    eval_dataset_path: str | None = field(
        default=None,
        metadata={"help": "Held-out JSONL (default: a hash-based 20%% split of --dataset_path)."},
    )
    methods: list[str] = field(
        default_factory=lambda: ["sft", "gmt"],
        metadata={"help": f"Methods trained one after the other from the same weights on the same batches; "
                          f"space- or comma-separated, from: {', '.join(METHODS)}."},
    )
    lora_learning_rate: float = field(
        default=3e-4,
        metadata={"help": "Learning rate of the methods that train LoRA adapters (--use_peft, or the 'lora' "
                          "method); --learning_rate is the one of full fine-tuning."},
    )
    eval_size: int = field(default=48, metadata={"help": "Held-out examples scored by answer loss (0: none)."})
    exact_match: int = field(
        default=0,
        metadata={"help": "Also greedy-decode this many held-out problems and score the final '#### number' "
                          "(slow on CPU; 0: off)."},
    )
    baseline: bool = field(default=True, metadata={"help": "Also evaluate the untrained model."})
    save_models: bool = field(default=False, metadata={"help": "Save each method's final weights under OUTPUT_DIR/<method>/model."})
    plot: bool = field(default=True, metadata={"help": "Write OUTPUT_DIR/loss_curves.png."})

    def __post_init__(self) -> None:
        methods = [m.strip() for item in ([self.methods] if isinstance(self.methods, str) else self.methods)
                   for m in str(item).split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"methods: unknown method(s) {unknown or methods}; choose from {', '.join(METHODS)}")
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods: listed twice: {methods}")
        self.methods = methods
        for name in ("eval_size", "exact_match"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lora_learning_rate > 0:
            raise ValueError(f"lora_learning_rate must be positive, got {self.lora_learning_rate}")


USAGE = "%(prog)s [--config FILE.yaml] [--FLAG VALUE ...]"
DESCRIPTION = (
    "Plain SFT vs Gradient-Mask Tuning side by side with the Hugging Face Trainer. With no arguments: the embedded "
    "SmolLM2-135M-Instruct on the embedded GSM8K split, on CPU, in minutes. Every flag is also a key of the --config "
    "YAML file; flags override the file."
)
JOB_GROUP = FinetuneArguments._argument_group_name
GMT_GROUP = "Gradient-Mask Tuning (GMTConfig)"  # GMTConfig._argument_group_name
REST_GROUP = "training (trl.SFTConfig, TrainingArguments) and model (trl.ModelConfig)"


def make_parser(prog: str = "gmt-plugins finetune") -> Any:
    """The ``TrlParser`` over the four dataclasses, with :data:`JOB_DEFAULTS`; errors raise :class:`FinetuneError`.

    Its help lists the job's flags, then GMT's, then the training and model flags."""
    from trl import ModelConfig, SFTConfig, TrlParser

    from gmt_plugins.config import GMTConfig

    class FinetuneParser(TrlParser):
        def error(self, message: str):  # one line, no usage block: the CLI prints it and exits 2
            raise FinetuneError(message)

    parser = FinetuneParser(
        (FinetuneArguments, SFTConfig, GMTConfig, ModelConfig), prog=prog, usage=USAGE, description=DESCRIPTION,
        formatter_class=HelpFormatter, add_help=False,
    )
    parser.set_defaults(**JOB_DEFAULTS)
    _arrange_help(parser, full=True)
    return parser


def make_help_parser(prog: str = "gmt-plugins finetune") -> Any:
    """A parser over the job's and GMT's flags only, for ``--help``: it needs no trl (whose import takes
    seconds), and its epilog names the training and model flags the job sets and ``--help-all``."""
    from transformers import HfArgumentParser

    from gmt_plugins.config import GMTConfig

    own = _own_fields()
    defaults = ", ".join(f"--{k} {' '.join(v) if isinstance(v, list) else v}" for k, v in JOB_DEFAULTS.items() if k not in own)
    parser = HfArgumentParser(
        (FinetuneArguments, GMTConfig), prog=prog, usage=USAGE, description=DESCRIPTION, formatter_class=HelpFormatter,
        add_help=False,
        epilog=f"Every trl.SFTConfig (TrainingArguments) and trl.ModelConfig field is a flag too; --help-all lists them "
        f"all. This job's defaults for them: {defaults}.",
    )
    parser.set_defaults(**{k: v for k, v in JOB_DEFAULTS.items() if k in own})
    _arrange_help(parser, full=False)
    return parser


def _arrange_help(parser: Any, *, full: bool) -> None:
    """The job's group first (with -h, --help-all and --config), then GMT's, then the rest; each ``--no_X`` flag
    with its own help; ``--strategy`` listing the registered strategies."""
    from gmt_plugins.plugins import strategy_registry

    groups = {g.title: g for g in parser._action_groups}
    job, gmt = groups[JOB_GROUP], groups[GMT_GROUP]
    job.add_argument("-h", "--help", action="help", help="Show the job's and GMT's flags and exit.")
    job.add_argument("--help-all", action="help", help="Show every flag, the training and model ones too, and exit (imports trl).")
    job.add_argument("--config", metavar="FILE.yaml", help="YAML file whose keys are any of the flags")  # TrlParser reads it before argparse
    job._group_actions[:] = job._group_actions[-3:] + job._group_actions[:-3]  # these three first
    rest = parser._optionals
    rest.title = REST_GROUP
    parser._action_groups[:] = [job, gmt] + ([rest] if full else [])
    for action in parser._actions:
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = f"Turn --{action.dest} off."
        elif action.dest == "strategy":
            names = strategy_registry().names()
            action.help = (
                f"Mask strategy, one of: {', '.join(names)}. `gmt-plugins list` shows each one with its strategy_options "
                "and their defaults."
            )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except for ``--no_X`` switches (the False they store is not a setting) and flags
    without a default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if (action.option_strings and action.option_strings[0].startswith("--no_")) or action.default in (None, argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


def _own_fields() -> set[str]:
    """The fields of the job's and GMT's dataclasses (the ones :func:`make_help_parser` parses)."""
    from gmt_plugins.config import GMTConfig

    return {f.name for f in dataclasses.fields(FinetuneArguments)} | {f.name for f in dataclasses.fields(GMTConfig)}


def parse_args(argv: list[str]) -> tuple[Any, Any, Any, Any]:
    """``(FinetuneArguments, SFTConfig, GMTConfig, ModelConfig)`` from flags and ``--config``; bad input is a
    :class:`FinetuneError` naming the field."""
    argv = _split_config_flag(list(argv))
    parser = make_parser()
    _, default_training, _, default_model, *_ = parser.parse_args_into_dataclasses(args=[])
    try:
        script, training, gmt, model, *_ = parser.parse_args_and_config(argv)
    except FileNotFoundError as err:
        raise FinetuneError(f"--config: file not found: {err.filename}") from None
    except (ValueError, TypeError) as err:
        raise FinetuneError(" ".join(str(err).split())) from None
    check_supported(training, default_training)
    check_supported(model, default_model)
    return script, training, gmt, model


def _split_config_flag(argv: list[str]) -> list[str]:
    """``--config=x.yaml`` as ``--config x.yaml`` (TrlParser only looks for the two-word form)."""
    out: list[str] = []
    for item in argv:
        out.extend(["--config", item.split("=", 1)[1]] if item.startswith("--config=") else [item])
    if out.count("--config") > 1:
        raise FinetuneError("--config given more than once")
    at = out.index("--config") if "--config" in out else None
    if at is not None and (at + 1 == len(out) or out[at + 1].startswith("--")):
        raise FinetuneError("argument --config: expected one argument")
    return out


def check_supported(parsed: Any, defaults: Any) -> None:
    """Fields the job cannot honour (:data:`UNSUPPORTED_SFT_FIELDS`, :data:`UNSUPPORTED_MODEL_FIELDS`) must keep
    their default value; ``defaults`` is the same dataclass parsed from no arguments."""
    if hasattr(parsed, "packing"):
        names, why = UNSUPPORTED_SFT_FIELDS, ("it tokenizes with answer-only labels itself and trains with the plain "
                                              "Trainer; for SFTTrainer's data options use SFTTrainer with GMTCallback")
    else:
        names, why = UNSUPPORTED_MODEL_FIELDS, "it loads local model folders only"
    for name in names:
        value, default = getattr(parsed, name), getattr(defaults, name)
        if value != default:
            raise FinetuneError(f"{name}={value!r} is not supported by gmt-plugins finetune ({why}); leave it at {default!r}")


def validate(script: FinetuneArguments, training: Any, gmt: Any, model: Any) -> None:
    """Checks the dataclasses cannot make on their own, before anything heavy is loaded."""
    from pathlib import Path

    from gmt_plugins.plugins import strategy_registry

    names = strategy_registry().names()
    wanted = {gmt.strategy} | {(METHODS[m][0] or {}).get("strategy", gmt.strategy) for m in script.methods}
    for strategy in sorted(wanted):
        if strategy not in names:
            raise FinetuneError(f"strategy: unknown strategy {strategy!r}; registered strategies: {', '.join(names)}")
    for method in script.methods:  # each method's own GMTConfig (its overrides applied), checked before any training
        overrides = METHODS[method][0]
        try:
            if overrides:
                dataclasses.replace(gmt, **overrides)
        except ValueError as err:
            raise FinetuneError(f"method {method!r}: {' '.join(str(err).split())}") from None
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training, name) < 1:
            raise FinetuneError(f"{name} must be at least 1, got {getattr(training, name)}")
    if training.max_length is None or training.max_length < 2:
        raise FinetuneError(f"max_length must be at least 2, got {training.max_length}")
    if training.max_steps == 0 or (training.max_steps < 0 and not training.num_train_epochs > 0):
        raise FinetuneError(f"max_steps must be at least 1 (or -1 with num_train_epochs > 0), got {training.max_steps}")
    if not training.learning_rate > 0:
        raise FinetuneError(f"learning_rate must be positive, got {training.learning_rate}")
    if model.lora_r < 1:
        raise FinetuneError(f"lora_r must be at least 1, got {model.lora_r}")
    if model.lora_task_type != "CAUSAL_LM":
        raise FinetuneError(f"lora_task_type must be 'CAUSAL_LM' (the job trains causal LMs), got {model.lora_task_type!r}")
    if training.eval_strategy != "no" and script.eval_size == 0:
        raise FinetuneError(f"eval_strategy={training.eval_strategy.value!r} needs held-out examples; eval_size is 0")
    if model.model_name_or_path is not None:
        folder = Path(model.model_name_or_path)
        if not folder.is_dir():
            raise FinetuneError(f"model_name_or_path: model folder not found: {folder} (local folders only)")
        if not (folder / "config.json").is_file():
            raise FinetuneError(f"model_name_or_path: {folder} is not a Hugging Face model folder (no config.json)")
    for name in ("dataset_path", "eval_dataset_path"):
        path = getattr(script, name)
        if path is not None and not Path(path).is_file():
            raise FinetuneError(f"{name}: file not found: {path}")
    if model.use_peft or any(METHODS[m][1] for m in script.methods):
        from gmt_plugins._import_utils import is_peft_available

        if not is_peft_available():
            raise FinetuneError('LoRA needs peft: pip install "gmt-plugins[peft]"')
