"""`advtrain` command line: the only place that reads argv and the environment.

The Typer app and its one error path (`run`: exit codes, crash logs) live here; the commands are in
data_commands (`advtrain data ...`), run_commands (train, tune, evaluate) and model_commands (models,
promote, rollback), imported at the end so that they register on these apps.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path

import typer
from typer.exceptions import TyperException

from pipeline.errors import InputError

app = typer.Typer(
    help="advtrain: distributed adversarial training on Ray, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Prepare and check datasets in advtrain's Parquet format.", no_args_is_help=True)
app.add_typer(data_app, name="data")
models_app = typer.Typer(
    help="Look at the model registry (versions, aliases, evaluation evidence).", no_args_is_help=True
)
app.add_typer(models_app, name="models")


# Exit codes (README "Errors and exit codes"): 0 done, 1 a documented refusal (a promotion gate failed),
# 2 bad input (the message says what to change), 3 a bug (the traceback is in the log file named).
EXIT_REFUSED, EXIT_BAD_INPUT, EXIT_BUG = 1, 2, 3


def run(argv: list[str] | None = None, *, prog_name: str = "advtrain") -> int:
    """Every command's one error path; the exit code. Bad input -> its message, 2; anything else is a
    bug -> 3, with the traceback in a log file whose path the message gives."""
    # MLflow draws a progress bar per artifact download; the CLI has its own progress output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        # Without standalone mode, typer returns the code of a `typer.Exit` (a refused promotion: 1).
        code = app(args=argv, prog_name=prog_name, standalone_mode=False)
        return code if isinstance(code, int) else 0
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:  # Ctrl-C at a prompt
        return 130
    except TyperException as usage:  # a usage error: unknown option, bad choice, missing value
        message = str(usage)
        getattr(usage, "show", lambda: typer.secho(f"error: {message}", err=True))()
        return EXIT_BAD_INPUT
    except InputError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        return EXIT_BAD_INPUT
    except Exception:  # by definition unexpected: reported as a bug, never as bad input
        log_path = _write_crash_log(traceback.format_exc())
        typer.secho(
            f"error: advtrain failed unexpectedly (a bug, not your input): {sys.exc_info()[1]!r}\n"
            f"The traceback is in {log_path}; please attach it to a bug report.",
            fg=typer.colors.RED,
            err=True,
        )
        return EXIT_BUG


def main() -> None:
    sys.exit(run())


def _write_crash_log(text: str) -> Path:
    folder = Path(os.environ.get("ADVTRAIN_LOG_DIR") or tempfile.gettempdir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix="advtrain-crash-", suffix=".log", dir=folder)
    except OSError:  # an unwritable ADVTRAIN_LOG_DIR must not hide the bug being reported
        handle, name = tempfile.mkstemp(prefix="advtrain-crash-", suffix=".log")
    with os.fdopen(handle, "w") as out:
        out.write(f"advtrain {' '.join(sys.argv[1:])}\n\n{text}")
    return Path(name)


# The commands register themselves on the apps above (hence imported last).
from pipeline.cli import data_commands, model_commands, run_commands  # noqa: E402
from pipeline.cli.data_commands import Source  # noqa: E402

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BUG",
    "EXIT_REFUSED",
    "Source",
    "app",
    "data_app",
    "data_commands",
    "main",
    "model_commands",
    "models_app",
    "run",
    "run_commands",
]
