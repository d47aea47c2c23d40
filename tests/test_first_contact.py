"""What a new user meets first: bad options refused when the config is built, misuse of the masker explained,
warnings pointing at the user's own line, a quiet import."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gmt_plugins import GMTConfig, GradientMasker

ROOT = Path(__file__).resolve().parents[1]


# -- strategy_options are validated with the config -----------------------------------------


@pytest.mark.parametrize(
    ("strategy", "options", "match"),
    [
        ("gmt", {"bad": 1}, r"strategy_options: strategy 'gmt' takes no options, got \['bad'\]"),
        ("hft", {"bad": 1}, r"strategy_options \['bad'\] are not options of strategy 'hft'; it takes \['interval'\]"),
        ("hft", {"interval": 0}, r"strategy_options of strategy 'hft': option 'interval' must be an integer >= 1, got 0"),
        ("hft", '{"interval": "x"}', r"option 'interval' must be an integer >= 1, got 'x'"),
        ("lisa", {"active_layers": 0}, r"strategy 'lisa': option 'active_layers'"),
    ],
)
def test_bad_strategy_options_fail_when_the_config_is_built(strategy, options, match):
    with pytest.raises(ValueError, match=match):
        GMTConfig(strategy=strategy, strategy_options=options)


def test_ratio_of_is_checked_against_the_strategy_when_the_config_is_built():
    with pytest.raises(ValueError, match=r"ratio_of='nonzero' has no meaning for strategy 'hft'"):
        GMTConfig(strategy="hft", ratio_of="nonzero")


def test_good_options_are_kept_and_an_unregistered_name_is_left_to_its_plugin_manager():
    assert GMTConfig(strategy="hft", strategy_options='{"interval": 3}').strategy_options == {"interval": 3}
    # a strategy registered only with a plugin manager passed to GMTCallback/GradientMasker is checked there
    assert GMTConfig(strategy="from_my_plugin", strategy_options={"any": 1}).strategy == "from_my_plugin"


def test_the_callback_refuses_bad_options_when_it_is_built():
    pytest.importorskip("transformers")
    from gmt_plugins import GMTCallback

    with pytest.raises(ValueError, match=r"not options of strategy 'hft'"):
        GMTCallback(strategy="hft", strategy_options={"bad": 1})
    with pytest.raises(ValueError, match=r"option 'interval' must be an integer >= 1"):
        GMTCallback(config=GMTConfig(strategy="hft"), strategy_options={"interval": 0})


def test_a_plugin_strategy_is_checked_by_the_callback_with_its_plugin_manager(pm):
    pytest.importorskip("transformers")
    from dataclasses import dataclass

    from gmt_plugins import GMTCallback, hookimpl
    from gmt_plugins.strategies.gmt import GMTStrategy

    @dataclass
    class Options:
        depth: int = 1

    class Mine(GMTStrategy):
        name = "mine_with_options"
        options_class = Options

    class Plugin:
        @hookimpl
        def gmt_register_strategies(self, register):
            register.add(Mine)

    pm.register(Plugin())
    assert GMTCallback(strategy="mine_with_options", strategy_options={"depth": 2}, plugin_manager=pm).config.strategy_options == {"depth": 2}
    with pytest.raises(ValueError, match=r"not options of strategy 'mine_with_options'; it takes \['depth'\]"):
        GMTCallback(strategy="mine_with_options", strategy_options={"width": 2}, plugin_manager=pm)


# -- the masker: what it takes, and a call that finds nothing to mask ------------------------


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))


@pytest.mark.parametrize(
    ("source", "match"),
    [
        (lambda m: [p for p in m.parameters()], r"entry 0 is a bare Parameter of shape \(4, 4\), not a \(str, Parameter\) pair"),
        (lambda m: [next(m.parameters())][0], r"got Parameter"),
        (lambda m: dict(m.named_parameters()), r"got dict \(for a dict, pass dict.items\(\)\)"),
        (lambda m: "model", r"got str"),
        (lambda m: [("0.weight",)], r"entry 0 is a tuple of 1 \(str\)"),
    ],
)
def test_wrong_argument_types_get_a_type_error_saying_what_is_accepted(source, match):
    with pytest.raises(TypeError, match=r"GradientMasker takes a torch.nn.Module or an iterable of \(name, parameter\) pairs.*" + match):
        GradientMasker(source(model()))


def test_named_parameters_as_a_generator_list_or_dict_items_are_accepted():
    m = model()
    for source in (m.named_parameters(), list(m.named_parameters()), dict(m.named_parameters()).items()):
        assert GradientMasker(source, mask_ratio=0.5).names == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_apply_before_backward_warns_once_at_the_callers_line():
    m = model()
    masker = GradientMasker(m, mask_ratio=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = masker.apply(); line = sys._getframe().f_lineno  # noqa: E702 - the warning must name this line
        masker.apply()
    assert stats.masked == 0
    found = [w for w in caught if "found no gradient" in str(w.message)]
    assert len(found) == 1, [str(w.message) for w in caught]
    assert "loss.backward()" in str(found[0].message) and "optimizer.zero_grad()" in str(found[0].message)
    assert found[0].filename == __file__ and found[0].lineno == line


def test_apply_after_backward_masks_and_does_not_warn():
    m = model()
    masker = GradientMasker(m, mask_ratio=0.5)
    m(torch.randn(8, 4)).pow(2).mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = masker.apply()
    assert stats.masked == sum(p.numel() // 2 for p in m.parameters())
    assert all(int((p.grad == 0).sum()) >= p.numel() // 2 for p in m.parameters())


def test_zero_grad_before_apply_is_warned_about():
    m = model()
    masker = GradientMasker(m, mask_ratio=0.5)
    m(torch.randn(8, 4)).pow(2).mean().backward()
    torch.optim.SGD(m.parameters(), lr=0.1).zero_grad()  # set_to_none: the gradients are gone
    with pytest.warns(UserWarning, match="found no gradient on any of its 4 selected parameter"):
        masker.apply()


# -- a quiet import ------------------------------------------------------------------------


def run_fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_gmt_plugins_own_code_imports_no_optional_stack_and_prints_nothing():
    """``import gmt_plugins``, the plugin manager, a masker step and the optimizer inspection import neither
    bitsandbytes nor DeepSpeed and print nothing (those run only when the user's setup uses them)."""
    code = (
        "import sys, torch\n"
        "import gmt_plugins\n"
        "from gmt_plugins import GradientMasker, get_plugin_manager\n"
        "from gmt_plugins.plugins import inspect_optimizer\n"
        "m = torch.nn.Linear(4, 4)\n"
        "masker = GradientMasker(m, mask_ratio=0.5)\n"
        "m(torch.randn(2, 4)).sum().backward()\n"
        "masker.apply()\n"
        "inspect_optimizer(torch.optim.AdamW(m.parameters()), masker.config)\n"
        "print(sorted(x for x in ('bitsandbytes', 'deepspeed', 'transformers', 'peft') if x in sys.modules))\n"
    )
    done = run_fresh(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n" and done.stderr == ""


def test_the_callback_adds_no_optional_stack_of_its_own():
    """``from gmt_plugins import GMTCallback`` and building one import nothing beyond what
    ``from transformers import TrainerCallback`` itself imports in this environment."""
    pytest.importorskip("transformers")
    probe = "import sys; {}; print(sorted(x for x in ('bitsandbytes', 'deepspeed') if x in sys.modules))"
    baseline = run_fresh(probe.format("from transformers import TrainerCallback"))
    ours = run_fresh(probe.format("from gmt_plugins import GMTCallback; GMTCallback(strategy='hft', mask_ratio=0.2)"))
    assert baseline.returncode == 0 and ours.returncode == 0, ours.stderr
    assert ours.stdout == baseline.stdout and ours.stderr == baseline.stderr


# -- finding flags and strategies ------------------------------------------------------------


def cli(*argv: str) -> subprocess.CompletedProcess:
    return run_fresh(f"import sys; from gmt_plugins.cli import main; sys.exit(main({list(argv)!r}))")


def flag_lines(text: str) -> list[str]:
    return [line.split()[0].rstrip(",") for line in text.splitlines() if line.startswith("  -")]


def test_finetune_help_lists_the_job_and_gmt_flags_first_without_importing_trl():
    pytest.importorskip("transformers")
    import dataclasses

    from gmt_plugins.finetune.arguments import FinetuneArguments

    probe = run_fresh(
        "import sys; from gmt_plugins.cli import main; main(['finetune', '--help']); "
        "print('imported:', sorted(m for m in ('trl', 'peft', 'bitsandbytes', 'deepspeed') if m in sys.modules))"
    )
    assert probe.returncode == 0 and probe.stderr == "", probe.stderr
    text = probe.stdout
    assert text.rstrip().endswith("imported: []")
    flags = flag_lines(text)
    own = [f"--{f.name}" for cls in (FinetuneArguments, GMTConfig) for f in dataclasses.fields(cls)]
    assert set(own) <= set(flags) and flags[:3] == ["-h", "--help-all", "--config"]
    assert flags.index("--plot") < flags.index("--mask_ratio")  # the job's group, then GMT's
    assert "--learning_rate 3e-05" in " ".join(text.split()) and "--help-all lists them all" in " ".join(text.split())
    assert len(text.splitlines()) < 150


def test_finetune_help_all_puts_the_job_and_gmt_before_the_training_flags(capsys):
    pytest.importorskip("trl")
    from gmt_plugins.cli import main

    with pytest.raises(SystemExit) as done:
        main(["finetune", "--help-all"])
    assert done.value.code == 0
    flags = flag_lines(capsys.readouterr().out)
    assert flags.index("--plot") < flags.index("--mask_ratio") < flags.index("--chunk_numel") < flags.index("--output_dir")
    assert flags.index("--chunk_numel") < flags.index("--model_name_or_path")


def test_negative_flags_have_their_own_help_and_strategy_lists_every_strategy(pm):
    pytest.importorskip("transformers")
    from gmt_plugins.finetune.arguments import make_help_parser
    from gmt_plugins.plugins import strategy_registry

    text = " ".join(make_help_parser().format_help().split())
    assert "--no_baseline, --no-baseline Turn --baseline off." in text
    assert "--no_plot, --no-plot Turn --plot off." in text
    assert "Also evaluate the untrained model. (default: True) --no_baseline" in text
    names = strategy_registry(pm).names()
    assert f"Mask strategy, one of: {', '.join(names)}." in text and len(names) > 2


def test_list_shows_options_with_defaults_and_wraps_at_word_boundaries():
    from gmt_plugins.cli import list_plugins

    text = list_plugins(width=72)
    lines = text.splitlines()
    assert all(len(line) <= 72 for line in lines if "://" not in line)
    hft = lines.index("  hft  gmt_plugins.strategies.hft.HFTStrategy")
    assert lines[hft + 1] == "      Half Fine-Tuning (Hui et al., https://arxiv.org/abs/2404.18466)."
    assert lines[hft + 2] == '      strategy_options (defaults): {"interval": 100}'
    assert '      strategy_options (defaults): none' in lines
    # every wrapped line ends on a whole word: joining the lines gives back the docstring's first paragraph
    from gmt_plugins.strategies.ist import ISTStrategy

    ist = lines.index("  ist  gmt_plugins.strategies.ist.ISTStrategy")
    end = next(i for i in range(ist + 1, len(lines)) if "strategy_options" in lines[i])
    paragraph = " ".join(ISTStrategy.__doc__.split("\n\n")[0].split())
    assert " ".join(line.strip() for line in lines[ist + 1 : end]) == paragraph


def test_cli_errors_come_before_any_work():
    pytest.importorskip("trl")
    for options, needle in [
        ('{"bad": 1}', "strategy_options ['bad'] are not options of strategy 'hft'"),
        ('{"interval": 0}', "option 'interval' must be an integer >= 1, got 0"),
    ]:
        done = cli("finetune", "--strategy", "hft", "--strategy_options", options, "--output_dir", "/nonexistent/gmt-out")
        lines = [line for line in done.stderr.splitlines() if line.startswith("gmt-plugins finetune")]
        assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""


def test_the_coverage_warning_of_a_resume_points_at_the_users_train_call(tmp_path):
    """Saved without track_coverage, resumed with it: the warning names the line that called trainer.train()."""
    pytest.importorskip("transformers")
    from tiny_trainer import tiny_trainer

    from gmt_plugins import GMTCallback

    tiny_trainer(tmp_path / "run", GMTCallback(mask_ratio=0.3), max_steps=2).train()
    resumed = tiny_trainer(tmp_path / "run", GMTCallback(mask_ratio=0.3, track_coverage=True), max_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.train(resume_from_checkpoint=True); line = sys._getframe().f_lineno  # noqa: E702 - the warning must name this line
    (found,) = [w for w in caught if "holds no coverage" in str(w.message)]
    assert (found.filename, found.lineno) == (__file__, line)
