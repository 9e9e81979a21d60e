"""python -m gse.dbproxy --config FILE"""
import sys

from gse.common.service import main as _main

from .server import DbProxyConfig, DbProxyService


def main() -> int:
    """Run dbproxy (`gse-dbproxy`); returns the process exit code."""
    return _main(DbProxyService, DbProxyConfig)


if __name__ == "__main__":
    sys.exit(main())
