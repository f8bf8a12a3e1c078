"""Study options generated from their settings dataclasses (``steerlab steer study``, ``steerlab
selfcorrect``): one declaration per setting, read by the command line."""

import dataclasses

import pytest
import typer
from typer.testing import CliRunner

from steerlab.cli import app
from steerlab.cli.settings import settings_options
from steerlab.experiments import steering_config
from steerlab.experiments.bench_config import PRESETS as BENCH_PRESETS
from steerlab.experiments.bench_config import BenchConfig
from steerlab.experiments.selfcorrect_config import PRESETS, SelfCorrectConfig
from steerlab.experiments.steering_config import SteeringStudy
from steerlab.options import option, specs

runner = CliRunner()


def _params(*path):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return {p.name: p for p in cmd.params}


@pytest.mark.parametrize("cls, path, presets", [(SteeringStudy, ("steer", "study"), {}),
                                                (SelfCorrectConfig, ("selfcorrect",), PRESETS),
                                                (BenchConfig, ("bench",), BENCH_PRESETS)])
def test_every_command_line_setting_is_an_option_with_the_declared_default_and_help(cls, path, presets):
    params = _params(*path)
    preset_fields = {k for p in presets.values() for k in p}
    offered = [s for s in specs(cls) if s.cli]
    assert offered and all(s.help for s in specs(cls))
    for s in specs(cls):
        if not s.cli:
            assert s.name not in params
            continue
        p = params[s.name]
        assert p.help.startswith(s.help.rstrip(".")), (s.name, p.help)
        if s.name in preset_fields:
            assert p.default is None and "default from --preset" in p.help
        elif s.type in (list, tuple):  # a comma-separated text that parses back to the declared default
            assert [s.item(x) for x in p.default.split(",") if x] == list(s.default)
        else:
            assert p.default == s.default, s.name
    # the dataclass's own defaults are the declared ones (the command and Python agree)
    assert dataclasses.asdict(cls()) == {s.name: s.default for s in specs(cls)}


def test_declared_choices_equal_the_registries_they_name():
    from steerlab.hooks import SCHEDULE_FNS
    from steerlab.steer.vector import FIT_METHODS, POSITIONS

    assert steering_config.POSITIONS == POSITIONS
    assert steering_config.FIT_METHODS == tuple(FIT_METHODS)
    assert steering_config.SCHEDULES == tuple(SCHEDULE_FNS)


def test_generated_options_reach_the_settings(tmp_path):
    """Values given on the command line arrive in the dataclass (checked before any model loads)."""
    r = runner.invoke(app, ["selfcorrect", "--out", str(tmp_path / "sc"), "--preset", "tiny", "--rounds", "1"])
    assert r.exit_code == 2 and "rounds must be >= 2" in r.output and not (tmp_path / "sc").exists()
    r = runner.invoke(app, ["selfcorrect", "--out", str(tmp_path / "sc"), "--directions", "sideways"])
    assert r.exit_code == 2 and "directions must be both, detox or toxify, got 'sideways'" in r.output
    r = runner.invoke(app, ["steer", "study", "--out", str(tmp_path / "s"), "--fractions", "1,x"])
    assert r.exit_code == 2 and "comma-separated list of floats" in r.output
    r = runner.invoke(app, ["steer", "study", "--out", str(tmp_path / "s"), "--sampling", "greedy"])
    assert r.exit_code == 2 and "No such option" in r.output  # declared cli=False: Python only
    r = runner.invoke(app, ["bench", "--out", str(tmp_path / "b"), "--methods", "steering,nope", "--k", "1"])
    assert r.exit_code == 2 and "unknown intervention method 'nope'" in r.output and not (tmp_path / "b").exists()
    r = runner.invoke(app, ["bench", "--out", str(tmp_path / "b"), "--preset", "huge"])
    assert r.exit_code == 2 and "unknown preset 'huge'" in r.output


def test_a_setting_declared_twice_is_refused():
    @dataclasses.dataclass
    class S:
        out: str = option("x", "An output.")

    def cmd(settings: dict, out: str = "") -> None:
        pass

    with pytest.raises(TypeError, match=r"declares \['out'\] itself and through S"):
        settings_options(S)(cmd)


def test_study_help_fits_80_columns():
    for args, option_name in ((["steer", "study", "--help"], "--n-neutral"), (["selfcorrect", "--help"], "--steer-pairs")):
        r = runner.invoke(app, args, env={"COLUMNS": "80"}, terminal_width=80)
        assert r.exit_code == 0 and "--max-new-tokens" in r.output and option_name in r.output
        assert all(len(line) <= 80 for line in r.output.splitlines())
