"""``nixpush-run``, the unattended command: runs deploys under a lock, writes a JSON report and
exits with an honest code (``runner``; the report and exit codes in ``report``)."""
