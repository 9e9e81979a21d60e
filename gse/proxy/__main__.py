"""python -m gse.proxy --config FILE"""
import sys

from gse.common.service import main as _main

from .server import ProxyConfig, ProxyService


def main() -> int:
    return _main(ProxyService, ProxyConfig)


if __name__ == "__main__":
    sys.exit(main())
