"""python -m gse.syncdata --config FILE"""
import sys

from gse.common.service import main as _main

from .server import SyncDataConfig, SyncDataService


def main() -> int:
    return _main(SyncDataService, SyncDataConfig)


if __name__ == "__main__":
    sys.exit(main())
