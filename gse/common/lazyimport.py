"""Modules imported on first use, for what the agent on every host may never need.

`grpc = lazy_module("grpc")` behaves as the module once an attribute is read (`grpc.aio.AioRpcError` imports
grpc then); until then nothing is loaded. gRPC costs a process ~18 MB and cryptography ~13 MB: an idle agent
carries neither (it streams data and fetches files with gRPC, and needs cryptography only to enroll).
"""

from __future__ import annotations

import importlib


class LazyModule:
    """A module, or an attribute of one (`attr`), loaded on first attribute access."""

    def __init__(self, module: str, attr: str = ""):
        self._module, self._attr, self._target = module, attr, None

    def __getattr__(self, name: str):
        target = self._target
        if target is None:
            target = importlib.import_module(self._module)
            if self._attr:
                target = getattr(target, self._attr)
            self._target = target
        return getattr(target, name)

    def __repr__(self) -> str:
        return f"<lazy {self._module}{'.' + self._attr if self._attr else ''}>"


def lazy_module(module: str, attr: str = "") -> LazyModule:
    """A stand-in for module `module` (or its attribute `attr`) imported at the first attribute read; ImportError or
    AttributeError surfaces then, not here."""
    return LazyModule(module, attr)
