"""
What an unattended run (``nixpush-run``) does, as plain values: its modes, the deploy files each
runs, and its defaults. Both the runner (``operations.run.runner``) and the schedule that starts
it (``operations.builder.timers``) read them here, so the schedule does not depend on the program.

.. code:: python

    SCHEDULE["check"]   # ("deploys/nas.py", "deploys/secrets.py", "deploys/pi.py")
"""

from __future__ import annotations

# Reports kept in the state dir; seconds one deploy may take before it is stopped.
DEFAULT_KEEP = 30
DEFAULT_TIMEOUT = 3600
# Seconds the on_failure command may take (then its process group is killed).
ALERT_TIMEOUT = 60
# Which deploys each mode runs, in order, unless --deploy says otherwise.
SCHEDULE: dict[str, tuple[str, ...]] = {
    "check": ("deploys/nas.py", "deploys/secrets.py", "deploys/pi.py"),
    "deploy": ("deploys/pi.py",),
}
