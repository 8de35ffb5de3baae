"""The module paths from before the layers became folders (issue 13), kept as deprecated aliases.

``import falcon_ext.falcon`` still works: it gives the module object of its new path
(``falcon_ext.falcon.FalconDrafter is falcon_ext.drafters.falcon.FalconDrafter``) and warns with a
DeprecationWarning that names that path. ``MOVED`` is the one table of moves; ``install``
(called by ``falcon_ext/__init__.py``) puts the finder on ``sys.meta_path``. There is no file
at an old path.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "falcon_ext.smollm2": "falcon_ext.downloads",
    "falcon_ext.generate": "falcon_ext.engine.generate",
    "falcon_ext.target_io": "falcon_ext.engine.target_io",
    "falcon_ext.kv_cache": "falcon_ext.engine.kv_cache",
    "falcon_ext.drafting": "falcon_ext.engine.drafting",
    "falcon_ext.sampling": "falcon_ext.engine.sampling",
    "falcon_ext.ops": "falcon_ext.engine.ops",
    "falcon_ext.testing": "falcon_ext.engine.references",
    "falcon_ext.prompt_lookup": "falcon_ext.drafters.prompt_lookup",
    "falcon_ext.falcon": "falcon_ext.drafters.falcon",
    "falcon_ext.cdt": "falcon_ext.drafters.tree",
    "falcon_ext.checkpoint": "falcon_ext.drafters.checkpoint",
    "falcon_ext.evaluate": "falcon_ext.evaluation.acceptance",
    "falcon_ext.cdt_tune": "falcon_ext.evaluation.tree_tuning",
    "falcon_ext.divergence": "falcon_ext.evaluation.divergence",
    "falcon_ext.bench": "falcon_ext.evaluation.bench",
    "falcon_ext.bench_report": "falcon_ext.evaluation.bench_report",
    "falcon_ext.data": "falcon_ext.training.data",
    "falcon_ext.conversations": "falcon_ext.training.conversations",
    "falcon_ext.distributed": "falcon_ext.training.distributed",
    "falcon_ext.train": "falcon_ext.training.train",
    "falcon_ext.train_state": "falcon_ext.training.run_state",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path of ``MOVED`` and loads it as the module of its new path."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} is deprecated: it moved to {new}", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system sets the alias spec on the module
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # the module keeps its own spec


def install() -> None:
    """Adds the finder to ``sys.meta_path`` once (after the path finders: only missing names reach it)."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())
