"""python -m gse.alarm --config FILE"""
import sys

from gse.common.service import main as _main

from .server import AlarmConfig, AlarmService


def main() -> int:
    """`python -m gse.alarm --config FILE` and the gse-alarm console script: run the alarm daemon; returns the exit
    status (1 on a configuration error)."""
    return _main(AlarmService, AlarmConfig)


if __name__ == "__main__":
    sys.exit(main())
