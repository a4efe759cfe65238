"""Test support: a Celery worker process that reads a poison image dies on the spot.

Put this folder on PYTHONPATH and every Python process imports this file at start. Only
Celery workers act on it: opening an image whose bytes carry POISON kills the process with
SIGKILL, as a decoder segfault or the OOM killer would.
"""

import os
import signal
from pathlib import Path
from typing import Any

POISON = b"CLIPSEARCH-TEST-POISON"

if b"celery" in Path("/proc/self/cmdline").read_bytes():
    import PIL.Image

    _open = PIL.Image.open

    def _open_or_die(fp: Any, *args: Any, **kwargs: Any) -> Any:
        if hasattr(fp, "getvalue") and POISON in fp.getvalue():
            os.kill(os.getpid(), signal.SIGKILL)
        return _open(fp, *args, **kwargs)

    PIL.Image.open = _open_or_die
