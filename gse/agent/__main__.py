"""python -m gse.agent --config FILE"""
import sys

from gse.common.service import main as _main

from .agent import Agent, AgentConfig


def main() -> int:
    return _main(Agent, AgentConfig)


if __name__ == "__main__":
    sys.exit(main())
