"""python -m gse.procmgr --config FILE"""
import sys

from gse.common.service import main as _main

from .server import ProcMgrConfig, ProcMgrService


def main() -> int:
    """Run procmgr (`gse-procmgr`, `python -m gse.procmgr --config FILE`) until SIGTERM; returns the exit code."""
    return _main(ProcMgrService, ProcMgrConfig)


if __name__ == "__main__":
    sys.exit(main())
