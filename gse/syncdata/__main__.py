"""python -m gse.syncdata --config FILE"""
import sys

from gse.common.service import main as _main

from .server import SyncDataConfig, SyncDataService


def main() -> int:
    """`python -m gse.syncdata --config FILE` and the gse-syncdata console script: run the syncdata daemon; returns
    the exit status (1 on a configuration error)."""
    return _main(SyncDataService, SyncDataConfig)


if __name__ == "__main__":
    sys.exit(main())
