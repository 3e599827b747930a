"""pyproject.toml: the `ddpm` command is ddpm_main.main, every module is installed, requirements.txt (what CI installs)
holds every dependency and extra."""

import re

import pytest

import ddpm_main
from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_ddpm_command_is_the_cli(capsys):
    module, function = PROJECT["project"]["scripts"]["ddpm"].split(":")
    main = getattr(__import__(module), function)
    assert main is ddpm_main.main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--export_diffusers" in capsys.readouterr().out


def test_every_module_is_installed():
    assert sorted(PROJECT["tool"]["setuptools"]["py-modules"]) == sorted(path.stem for path in REPO.glob("ddpm_*.py"))


def test_requirements_hold_every_dependency_and_extra():
    name = lambda requirement: re.split(r"[<>=\[ ;]", requirement.strip(), maxsplit=1)[0].lower()  # noqa: E731
    required = {
        name(line)
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    declared = PROJECT["project"]["dependencies"] + [
        dep for extra in PROJECT["project"]["optional-dependencies"].values() for dep in extra
    ]
    assert {name(dep) for dep in declared} <= required
    assert set(PROJECT["project"]["optional-dependencies"]) == {"eval", "diffusers", "tensorboard"}
