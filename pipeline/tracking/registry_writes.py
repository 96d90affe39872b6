"""Registry writes that are all or nothing: each write is built with its undo, reading what it will
replace before any write happens, so that a failure part-way can put back exactly what was there.
Every undo is idempotent (set the value before again, or delete what was absent before)."""

from __future__ import annotations

from collections.abc import Callable

from mlflow.exceptions import MlflowException

from pipeline.errors import TrackingError

# (do, undo)
Write = tuple[Callable[[], None], Callable[[], None]]


def all_or_nothing(writes: list[Write], what: str) -> None:
    """Run `writes` in order; if one fails, undo it and every one before it, newest first, and raise a
    TrackingError that says whether the registry is as it was."""
    done: list[Write] = []
    try:
        for write in writes:
            # Counted as done before it runs: a write that fails may still have reached the store (a
            # lost reply).
            done.append(write)
            write[0]()
    except MlflowException as err:
        undo_failed = []
        for _, undo in reversed(done):
            try:
                undo()
            except MlflowException as undo_err:
                undo_failed.append(str(undo_err).splitlines()[0])
        state = (
            "every earlier write was undone: the registry is as it was"
            if not undo_failed
            else f"undoing the earlier writes ALSO failed ({'; '.join(undo_failed)}): check `advtrain models show`"
        )
        raise TrackingError(f"{what} failed while writing ({str(err).splitlines()[0]}); {state}") from None


def model_tag_write(client, model, key: str, value: str) -> Write:
    """Set the registered model's tag `key` (`model` as read before any write)."""
    before = model.tags.get(key)

    def put(text: str | None) -> None:
        if text is not None:
            client.set_registered_model_tag(model.name, key, text)
        elif key in client.get_registered_model(model.name).tags:
            client.delete_registered_model_tag(model.name, key)

    return lambda: put(value), lambda: put(before)


def version_tag_write(client, name: str, version: str, key: str, value: str, before: str | None) -> Write:
    """Set tag `key` of version `version`; `before` is its value now (None: absent)."""

    def put(text: str | None) -> None:
        if text is not None:
            client.set_model_version_tag(name, version, key, text)
        elif key in client.get_model_version(name, version).tags:
            client.delete_model_version_tag(name, version, key)

    return lambda: put(value), lambda: put(before)


def alias_write(client, model, alias: str, version: str | None) -> Write:
    """Point `alias` at `version` (None: remove it); `model` as read before any write."""
    before = model.aliases.get(alias)

    def point(target: str | None) -> None:
        if target is not None:
            client.set_registered_model_alias(model.name, alias, str(target))
        elif alias in client.get_registered_model(model.name).aliases:
            client.delete_registered_model_alias(model.name, alias)

    return lambda: point(version), lambda: point(before)
