"""python -m gse.dataserver --config FILE"""
import sys

from gse.common.service import main as _main

from .server import DataServerConfig, DataServerService


def main() -> int:
    """Run the data server (`gse-dataserver`); returns the process exit code."""
    return _main(DataServerService, DataServerConfig)


if __name__ == "__main__":
    sys.exit(main())
