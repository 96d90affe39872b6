"""docs/configuration.md is generated from the config models and must match them."""

from pathlib import Path

from pipeline.config import Config, _tables
from pipeline.config_docs import main, render

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_config_field_has_a_description():
    missing = [
        f"{table}.{name}"
        for table, model in _tables(Config).items()
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert not missing, f"config fields without a description= (add one in pipeline/config/): {missing}"


def test_configuration_page_is_up_to_date():
    assert PAGE.is_file(), f"{PAGE} is missing: run `make docs`"
    assert PAGE.read_text() == render(), f"{PAGE} is stale: run `make docs` (python -m pipeline.config_docs)"


def test_page_lists_every_key_with_its_allowed_values():
    page = render()
    for table, model in _tables(Config).items():
        assert f"## `[{table}]`" in page
        for name in model.model_fields:
            assert f"| `{table}.{name}` |" in page
    assert "| `run.weight_average_decay` | float | `0.0` | [0, 1) |" in page
    assert '| `model.name` | str | `"small_cnn"` | `small_cnn`, `preact_resnet18`, `wide_resnet` |' in page
    assert '| `run.mixed_precision` | str | `"none"` | `none`, `bf16`, `auto` |' in page


def test_check_flags_a_stale_page_and_write_fixes_it(tmp_path, capsys):
    out = tmp_path / "configuration.md"
    out.write_text("# old\n")
    assert main(["--check", "--out", str(out)]) == 1
    assert "run `make docs`" in capsys.readouterr().err
    assert main(["--out", str(out)]) == 0
    assert out.read_text() == render()
    assert main(["--check", "--out", str(out)]) == 0
