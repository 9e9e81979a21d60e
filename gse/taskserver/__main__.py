"""python -m gse.taskserver --config FILE"""
import sys

from gse.common.service import main as _main

from .server import TaskServerConfig, TaskServerService


def main() -> int:
    """Run the task server (`gse-taskserver`), as one process or as a supervisor of `workers` processes; returns the
    exit code."""
    return _main(TaskServerService, TaskServerConfig)


if __name__ == "__main__":
    sys.exit(main())
