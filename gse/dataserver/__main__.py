"""python -m gse.dataserver --config FILE"""
import sys

from gse.common.service import main as _main

from .server import DataServerConfig, DataServerService


def main() -> int:
    return _main(DataServerService, DataServerConfig)


if __name__ == "__main__":
    sys.exit(main())
