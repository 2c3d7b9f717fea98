"""griffe extension: the ``Args`` section that ``described_by`` writes at import time.

The deployed flows take flat parameters described by their request model
(``prefect_orthanc.flows.parameters.described_by``): the decorator appends an ``Args:`` section
built from the model's field descriptions to the flow's docstring when the module is imported,
which is what Prefect's UI shows. griffe reads the sources, where that section is not written;
this extension imports the module of each function decorated with ``described_by`` and
documents the docstring the flow really has.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import griffe


class DescribedBy(griffe.Extension):
    def on_function_instance(self, *, func: griffe.Function, **kwargs: Any) -> None:
        if not any("described_by" in str(d.value) for d in func.decorators):
            return
        # Prefect parses a flow's docstring with griffe when the flow is defined, without the
        # function's annotations: its "no type or annotation" warnings are not the docs'.
        with _quiet("griffe", "mkdocs.plugins.griffe"):  # griffe's, alone or under mkdocs
            module = importlib.import_module(func.module.path)
        runtime = getattr(module, func.name)
        doc = getattr(getattr(runtime, "fn", runtime), "__doc__", None)
        if not doc or func.docstring is None:
            raise ValueError(f"{func.path}: decorated with described_by but has no docstring")
        func.docstring.value = inspect.cleandoc(doc)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Drop these loggers' records for the block (a filter: importing Prefect the first time
    reconfigures logging, which would undo ``logger.disabled``)."""
    loggers = [logging.getLogger(name) for name in names]
    drop = logging.Filter("-")  # matches no logger name: every record is dropped
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
