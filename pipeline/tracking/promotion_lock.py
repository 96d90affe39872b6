"""The promotion lock: promotions and rollbacks of one registered model run one at a time, from any
machine. Creating the registered model `<name>.promotion-lock` succeeds for exactly one process (the
tracking store's unique name constraint); a lock older than `LOCK_STALE_S` (a crashed holder) is broken.
"""

from __future__ import annotations

import getpass
import math
import socket
import time

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)

from pipeline.errors import TrackingError
from pipeline.tracking.runs import code_in

LOCK_SUFFIX = ".promotion-lock"
LOCK_STALE_S = 600.0


_NOT_FOUND = (RESOURCE_DOES_NOT_EXIST,)

# Lock contention, as MLflow reports it to the loser: the name exists; or it vanished between the SQL
# store's failed insert and its look-up of the existing model (the holder released it); or the store is
# busy with the racing writers (sqlite "database is locked"). All three mean: wait and retry.
_LOCK_BUSY = (RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE)


class PromotionLock:
    """Mutual exclusion through the tracking store's unique registered-model names."""

    def __init__(self, client, name: str, *, timeout_s: float = 120.0) -> None:
        self.client, self.lock_name, self.timeout_s = client, name + LOCK_SUFFIX, timeout_s

    def __enter__(self) -> PromotionLock:
        deadline = time.monotonic() + self.timeout_s
        holder = f"{getpass.getuser()}@{socket.gethostname()}"
        while True:
            try:
                self.client.create_registered_model(
                    self.lock_name,
                    tags={"holder": holder, "since": str(time.time())},
                    description="advtrain promotion lock: held while a promotion/rollback runs",
                )
                return self
            except MlflowException as err:
                if not code_in(err, _LOCK_BUSY):
                    raise
            self._break_if_stale()
            if time.monotonic() > deadline:
                raise TrackingError(
                    f"another promotion of this model holds '{self.lock_name}'; retry later, or delete that "
                    "registered model if its holder crashed"
                )
            time.sleep(0.2)

    def _break_if_stale(self) -> None:
        try:
            lock = self.client.get_registered_model(self.lock_name)
        except MlflowException as err:
            if code_in(err, (RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE)):  # released, or busy: retry
                return
            raise
        if _lock_age_s(lock) > LOCK_STALE_S:
            try:
                self.client.delete_registered_model(self.lock_name)
            except MlflowException as err:
                if not code_in(err, _NOT_FOUND):  # someone else broke it first
                    raise

    def __exit__(self, *exc: object) -> None:
        self.client.delete_registered_model(self.lock_name)


def _lock_age_s(lock) -> float:
    """Seconds since the lock was taken, by the store's creation time of the lock: no tag can corrupt it
    (a garbage or future `since` once made a crashed holder's lock unbreakable). The `since` tag, the
    holder's clock, is used only where the store gives no creation time."""
    if lock.creation_timestamp:
        return time.time() - lock.creation_timestamp / 1000
    try:
        since = float(lock.tags.get("since", "nan"))
    except (TypeError, ValueError):
        since = math.nan
    return time.time() - since if math.isfinite(since) and since <= time.time() else math.inf
