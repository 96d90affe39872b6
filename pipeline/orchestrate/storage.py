"""Run storage: where a run's checkpoints live (a local folder or a filesystem URI every node reaches),
what state a run name is in, and the marker a finished run leaves. Ray Train writes the checkpoints;
this module only reads the layout and writes the marker."""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

import pyarrow.fs

from pipeline.config import Config
from pipeline.errors import checked_name

FINISHED_MARKER = "advtrain_finished.json"


def _storage_uri(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _fs_and_path(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if "://" in uri:
        return pyarrow.fs.FileSystem.from_uri(uri)
    return pyarrow.fs.LocalFileSystem(), uri


def absolute_locations(config: Config, base: Path) -> tuple[Path, str]:
    """(data path, storage URI) resolved against `base`: Ray processes run in other working folders."""
    data_path = Path(config.data.path)
    data_path = data_path if data_path.is_absolute() else (base / data_path).resolve()
    storage = config.run.storage_path
    return data_path, _storage_uri(storage if "://" in storage else str(base / storage))


def _run_dir(storage: str, name: str) -> tuple[pyarrow.fs.FileSystem, str]:
    checked_name(name, "run name")  # the one place a name becomes a path: never '..', '/' or a quote
    fs, base = _fs_and_path(storage)
    return fs, f"{base.rstrip('/')}/{name}"


def run_state(storage: str, name: str) -> str:
    """'new', 'resumable' (has checkpoints) or 'finished'."""
    fs, run_dir = _run_dir(storage, name)
    if fs.get_file_info(f"{run_dir}/{FINISHED_MARKER}").type == pyarrow.fs.FileType.File:
        return "finished"
    if fs.get_file_info(run_dir).type != pyarrow.fs.FileType.Directory:
        return "new"
    entries = fs.get_file_info(pyarrow.fs.FileSelector(run_dir))
    has_checkpoint = any(Path(e.path).name.startswith("checkpoint_") for e in entries)
    return "resumable" if has_checkpoint else "new"


def finished_run_record(storage: str, name: str) -> dict[str, Any] | None:
    """What a finished run wrote at its end (its MLflow run id and summary), or None if it has not finished."""
    fs, run_dir = _run_dir(storage, name)
    try:
        with fs.open_input_stream(f"{run_dir}/{FINISHED_MARKER}") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def unique_run_name(prefix: str = "run") -> str:
    """`<prefix>-<YYYYmmdd-HHMMSS>-<4 hex digits>`; the prefix (a config file's stem) cut down to what
    names allow."""
    prefix = re.sub(r"[^A-Za-z0-9._-]+", "-", prefix).strip("._-")[:80] or "run"
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def write_finished_record(storage: str, name: str, record: dict[str, Any]) -> None:
    """Mark run `name` finished: a later run of that name is refused instead of "resuming" to nothing."""
    fs, run_dir = _run_dir(storage, name)
    with fs.open_output_stream(f"{run_dir}/{FINISHED_MARKER}") as f:
        f.write(json.dumps(record).encode())
