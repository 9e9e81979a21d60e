"""python -m gse.apiserver --config FILE"""
import sys

from gse.common.service import main as _main

from .server import ApiServerConfig, ApiServerService


def main() -> int:
    """Run the API server (`gse-apiserver`); returns the process exit code."""
    return _main(ApiServerService, ApiServerConfig)


if __name__ == "__main__":
    sys.exit(main())
