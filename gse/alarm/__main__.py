"""python -m gse.alarm --config FILE"""
import sys

from gse.common.service import main as _main

from .server import AlarmConfig, AlarmService


def main() -> int:
    return _main(AlarmService, AlarmConfig)


if __name__ == "__main__":
    sys.exit(main())
