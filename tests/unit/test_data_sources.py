"""`advtrain data prepare` offers exactly the sources in pipeline.data's registry and asks for what they need."""

import json

import pytest
from typer.testing import CliRunner

from pipeline import cli
from pipeline.cli import Source, app
from pipeline.data import SOURCES


def test_cli_choices_are_the_registry():
    assert [choice.value for choice in Source] == list(SOURCES)
    result = CliRunner().invoke(app, ["data", "prepare", "no-such-source"])
    assert result.exit_code == 2 and "is not one of" in result.output


@pytest.mark.parametrize("name", [name for name, spec in SOURCES.items() if spec.needs])
def test_cli_asks_for_the_source_the_registry_needs(name, tmp_path, capsys):
    assert cli.run(["data", "prepare", name, "--out", str(tmp_path / "out")]) == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err == f"error: {name} needs --source {SOURCES[name].needs}\n"
    assert not (tmp_path / "out").exists()


def test_cli_digits_writes_what_prepare_digits_writes(digits_path, tmp_path):
    result = CliRunner().invoke(app, ["data", "prepare", "digits", "--out", str(tmp_path / "digits")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {tmp_path / 'digits'}: shape (1, 8, 8), 10 classes")
    written = json.loads((tmp_path / "digits" / "metadata.json").read_text())
    expected = json.loads((digits_path / "metadata.json").read_text())
    assert written == expected
