"""Atomic-task dependencies (spec §4 `atomic_tasks_relations`): one cycle check for the API and the agent."""

from __future__ import annotations

import graphlib
from typing import Mapping, Sequence


def dependency_cycle(depends_on: Mapping[int, Sequence[int]]) -> list[int] | None:
    """A cycle among the tasks (`task -> the tasks it depends on`) as [a, b, ..., a], or None. Tasks named
    only as dependencies count as tasks without dependencies."""
    try:
        graphlib.TopologicalSorter(depends_on).prepare()
    except graphlib.CycleError as exc:
        cycle = list(exc.args[1])
        return cycle[::-1]          # graphlib lists it against the edges' direction
    return None
