"""python -m gse.fileserver --config FILE"""
import sys

from gse.common.service import main as _main

from .server import FileServerConfig, FileServerService


def main() -> int:
    """Run the file server (`gse-fileserver`); returns the process exit code."""
    return _main(FileServerService, FileServerConfig)


if __name__ == "__main__":
    sys.exit(main())
