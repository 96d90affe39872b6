"""Core modules never import ray or mlflow, and importing the package has no side effects."""

import subprocess
import sys

CORE = [
    "config",
    "data",
    "models",
    "attacks",
    "methods",
    "schedules",
    "training",
    "evaluate",
    "evaluation_report",
    "card",
    "sanity",
    "search",
    "cli",
    "config_docs",
]


def test_core_modules_do_not_import_ray_or_mlflow(tmp_path):
    code = (
        "import sys\n"
        + "".join(f"import pipeline.{m}\n" for m in CORE)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
        + "assert not bad, bad\n"
        + "import os; assert os.listdir('.') == [], os.listdir('.')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
