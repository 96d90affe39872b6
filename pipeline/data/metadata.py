"""metadata.json: its strict schema and every consistency check, one place for writer and reader.

metadata.json is the record of a prepared dataset: a reader trusts it for the image shape, the
classes, the model's normalisation and which files hold which split. So it is parsed strictly
(unknown keys, wrong types, bools for numbers and missing keys refused) and then checked for the
lies a schema cannot see: class names that do not match num_classes, mean/std of another channel
count, file names that point outside the dataset folder or are listed twice. Every failure is a
`DataError` naming the file and the key. numpy and pyarrow are not needed here.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
METADATA_FILE = "metadata.json"

# pyarrow's fixed_size_binary stores the row width as an int32.
MAX_ROW_BYTES = 2**31 - 1
# A dataset of 50,000-row files needs a few hundred bytes per file; anything near this is not ours.
MAX_METADATA_BYTES = 16 * 2**20
# What to do about any problem in metadata.json: it is a record, not a settings file.
REMEDY = "metadata.json is written by `advtrain data prepare`: prepare the dataset again rather than editing it"

# A file entry names a file directly inside its split's folder: no '..', no absolute path, no
# separator tricks, so another dataset's file can never be read as this one's.
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}\.parquet")
_SHA256 = r"[0-9a-f]{64}"
_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)
# What any dataset (and any architecture record, pipeline.models) may claim: generous for every network
# here, and what a model trained on it can be stored and loaded with.
MAX_CLASSES, MAX_CHANNELS, MAX_SIDE = 100_000, 64, 4096
# Values quoted in messages: short, and safe on deeply nested junk (a plain repr could recurse too deep).
_SHORT = reprlib.Repr()  # keyword arguments need Python 3.12
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 2, 60, 60, 4, 4

PositiveInt = Annotated[int, Field(ge=1, le=MAX_ROW_BYTES)]


class FileEntry(BaseModel):
    model_config = _STRICT
    name: str
    num_rows: Annotated[int, Field(ge=1, le=2**40)]  # the writer never writes an empty file
    sha256: Annotated[str, Field(pattern=_SHA256)]


class SplitFiles(BaseModel):
    model_config = _STRICT
    train: Annotated[list[FileEntry], Field(min_length=1)]
    val: Annotated[list[FileEntry], Field(min_length=1)]
    test: Annotated[list[FileEntry], Field(min_length=1)]


class Metadata(BaseModel):
    """The content of metadata.json, every field required, nothing else allowed."""

    model_config = _STRICT
    format_version: int
    source: Annotated[str, Field(min_length=1)]
    shape: Annotated[list[Annotated[int, Field(ge=1, le=MAX_SIDE)]], Field(min_length=3, max_length=3)]
    num_classes: Annotated[int, Field(ge=2, le=MAX_CLASSES)]
    class_names: list[str]
    mean: list[float]
    std: list[float]
    splits: SplitFiles
    # raw: each row holds C*H*W uint8 pixels; encoded: each row holds a PNG, JPEG or WebP file's bytes.
    image_encoding: Literal["raw", "encoded"] = "raw"


def parse_metadata(meta_file: Path) -> Metadata:
    """metadata.json -> Metadata with every check applied; any problem is a DataError naming the key."""
    raw = _load_json(meta_file)
    version = raw.get("format_version") if isinstance(raw, dict) else None
    # Another version's file may differ in any key: say so before the schema's first complaint.
    if type(version) is int and version != FORMAT_VERSION:
        raise DataError(
            f"{meta_file}: format_version {_SHORT.repr(version)}, this version of advtrain reads "
            f"{FORMAT_VERSION}; use the advtrain that wrote it, or prepare the dataset again"
        )
    try:
        meta = Metadata.model_validate(raw)
    except ValidationError as err:
        raise DataError(f"{meta_file}: {_describe(err)}; {REMEDY}") from None
    for check in CHECKS:
        problem = check(meta)
        if problem:
            raise DataError(f"{meta_file}: {problem}; {REMEDY}")
    return meta


def _load_json(meta_file: Path) -> object:
    """The parsed JSON of metadata.json; unreadable, oversized, non-UTF-8 or invalid -> DataError."""
    try:
        size = meta_file.stat().st_size
        data = meta_file.read_bytes() if size <= MAX_METADATA_BYTES else None
    except OSError as err:
        raise DataError(f"{meta_file}: cannot read it ({err.strerror or err})") from None
    if data is None:
        raise DataError(f"{meta_file}: {size} bytes, more than a metadata.json can be ({MAX_METADATA_BYTES}); {REMEDY}")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{meta_file}: not UTF-8 text (byte {err.start}); {REMEDY}") from None
    except ValueError as err:  # json.JSONDecodeError, and integers too long to convert
        raise DataError(f"{meta_file}: not valid JSON ({err}); {REMEDY}") from None
    except RecursionError:
        raise DataError(f"{meta_file}: not valid JSON (nested too deeply); {REMEDY}") from None


def _describe(err: ValidationError) -> str:
    """pydantic's first error as 'key K: problem (got V)'; the count of the others."""
    errors = err.errors(include_url=False)
    first = errors[0]
    key = _dotted(first["loc"])
    if first["type"] == "missing":
        text = f"key '{key}' is missing"
    elif first["type"] == "extra_forbidden":
        text = f"key '{key}' is not part of the format (allowed: {', '.join(_allowed_keys(first['loc']))})"
    elif first["type"] in ("model_type", "dict_type"):
        text = f"{f'key {key!r}' if key else 'the file'} must be a JSON object (got {_SHORT.repr(first['input'])})"
    else:
        text = f"key '{key}': {first['msg'].lower()} (got {_SHORT.repr(first['input'])})"
    others = len(errors) - 1
    return text + (f" (and {others} more problem{'s' if others > 1 else ''})" if others else "")


def _dotted(loc: tuple) -> str:
    """('splits', 'train', 0, 'sha256') -> 'splits.train[0].sha256'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Metadata
    if len(loc) > 1 and loc[0] == "splits":
        model = SplitFiles if len(loc) == 2 else FileEntry
    return list(model.model_fields)


# --------------------------------------------------------------------------- consistency checks
# Each returns a problem (naming the key) or None; `parse_metadata` runs them in order.


def class_names_problem(class_names: list[str] | tuple[str, ...], num_classes: int) -> str | None:
    """Shared with the writer: as many distinct, non-empty names as classes, at least 2 classes."""
    if num_classes < 2:
        return f"'num_classes' is {num_classes}: a classifier needs at least 2 classes"
    if len(class_names) != num_classes:
        return f"'class_names' has {len(class_names)} names but 'num_classes' is {num_classes}"
    if any(not isinstance(n, str) or not n for n in class_names) or len(set(class_names)) != len(class_names):
        return f"'class_names' must be distinct non-empty strings, got {_SHORT.repr(list(class_names))}"
    return None


def _class_names(meta: Metadata) -> str | None:
    return class_names_problem(meta.class_names, meta.num_classes)


def _channels(meta: Metadata) -> str | None:
    if meta.shape[0] > MAX_CHANNELS:
        return f"'shape' {meta.shape}: at most {MAX_CHANNELS} channels (the first entry, C of C,H,W)"
    return None


def _row_bytes(meta: Metadata) -> str | None:
    if math.prod(meta.shape) > MAX_ROW_BYTES:
        return f"key 'shape' {meta.shape} needs {math.prod(meta.shape)} bytes per image, more than {MAX_ROW_BYTES}"
    return None


def _channel_stats(meta: Metadata) -> str | None:
    """mean/std are per channel of pixels in [0,1]; the model divides by std, so std > 0."""
    channels = meta.shape[0]
    for key, values, low_ok in (("mean", meta.mean, True), ("std", meta.std, False)):
        if len(values) != channels:
            return f"key '{key}' has {len(values)} values but 'shape' {meta.shape} has {channels} channels"
        for i, v in enumerate(values):
            if not math.isfinite(v) or v > 1.0 or v < 0.0 or (v == 0.0 and not low_ok):
                bounds = "[0, 1]" if low_ok else "(0, 1]"
                return f"key '{key}[{i}]' is {v}: it must be finite and in {bounds} (pixels lie in [0,1])"
    return None


def _file_names(meta: Metadata) -> str | None:
    """Each name is 'SPLIT/FILE.parquet' inside the dataset folder, and no file is listed twice."""
    seen: set[str] = set()
    for split in SPLITS:
        for i, entry in enumerate(getattr(meta.splits, split)):
            key = f"splits.{split}[{i}].name"
            folder, _, file = entry.name.partition("/")
            if folder != split or not _FILE_NAME.fullmatch(file):
                return (
                    f"key '{key}' is {_SHORT.repr(entry.name)}: it must be '{split}/<file>.parquet' inside the "
                    "dataset folder (a dataset reads only its own files: no absolute paths, no '..')"
                )
            if entry.name in seen:
                return f"key '{key}': {entry.name} is listed twice (a file belongs to one split, once)"
            seen.add(entry.name)
    return None


CHECKS: tuple[Callable[[Metadata], str | None], ...] = (
    _class_names,
    _channels,
    _row_bytes,
    _channel_stats,
    _file_names,
)
