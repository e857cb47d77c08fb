"""Fault injection for the kill tests, loaded by Python at start-up when this folder is on
PYTHONPATH (tests/test_kill_each_step.py puts it there for the processes it starts).

With ``RECOVERY_TEST_HANG_AT=<text>``, the first rename into place of a file whose target path
contains ``<text>`` does not happen: the process writes the temporary and target paths to
``$RECOVERY_TEST_MARKER`` and sleeps, with the file fully written under its temporary name, the
step half done, so the test can kill it at that exact point."""

import os

_AT = os.environ.get("RECOVERY_TEST_HANG_AT")

if _AT:
    import time

    _replace = os.replace

    def _hanging_replace(src, dst, *args, **kwargs):
        if _AT in os.fspath(dst):
            with open(os.environ["RECOVERY_TEST_MARKER"], "w") as fh:
                fh.write(f"{os.fspath(src)}\n{os.fspath(dst)}\n")
            while True:
                time.sleep(1)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _hanging_replace
