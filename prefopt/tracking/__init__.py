"""MLflow tracking of runs and side-by-side comparison of methods (controller side only).

Workers never import this package: the controller collects their metrics and logs them.
`Tracker` logs one run; `resolve_tracking_uri` says where runs go; `prefopt compare` and
`prefopt runs` (prefopt.tracking.cli) read them back.
"""

from __future__ import annotations

import os

# Read by MLflow when it is first imported: no usage telemetry (this may run with no network
# at all), no INFO lines such as "Creating initial MLflow database tables...", and no
# "View run at <url>" printed to stdout each time a run ends on a server.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from prefopt.tracking.store import TrackingError, resolve_tracking_uri  # noqa: E402

__all__ = ["Tracker", "TrackingError", "resolve_tracking_uri"]


def __getattr__(name: str):
    # Tracker imports MLflow (seconds); keep `prefopt --help` and the config code fast.
    if name == "Tracker":
        from prefopt.tracking.tracker import Tracker

        return Tracker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
