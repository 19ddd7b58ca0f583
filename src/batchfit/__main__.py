"""``python -m batchfit`` (and ``torchrun -m batchfit``) run the command line.

Under torchrun each process joins the process group first (:mod:`batchfit.distributed`); only
rank 0 prints its result, the others keep stderr for their own errors. Without torchrun nothing
here loads torch, so ``batchfit plan`` and ``--help`` stay light.
"""

import os
import sys

from batchfit.cli import main


def _run() -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return main()
    import batchfit.distributed as distributed

    joined = distributed.join_from_env()
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the process's life
    try:
        return main()
    finally:
        if joined:
            distributed.leave()


sys.exit(_run())
