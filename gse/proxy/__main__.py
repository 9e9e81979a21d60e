"""python -m gse.proxy --config FILE"""
import sys

from gse.common.service import main as _main

from .server import ProxyConfig, ProxyService


def main() -> int:
    """`python -m gse.proxy --config FILE` and the gse-proxy console script: run the proxy daemon; returns the exit
    status (1 on a configuration error)."""
    return _main(ProxyService, ProxyConfig)


if __name__ == "__main__":
    sys.exit(main())
