"""Public tasks and flows document their shapes, units and errors, with an example.

Every Prefect task and flow that a module of ``prefect_orthanc.tasks`` or
``prefect_orthanc.flows`` exports (``__all__``) has, in the docstring Prefect and the API
reference show (``described_by`` flows included), an ``Args`` section naming every parameter,
a ``Returns`` section unless it returns None, a ``Raises`` section and an ``Example``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

from prefect import Flow, Task

import prefect_orthanc.flows
import prefect_orthanc.tasks

_SECTION = re.compile(r"^(\w[\w ]*):\s*$")
_ITEM = re.compile(r"^    \*{0,2}(\w+)(?: \([^)]*\))?:")


def public_tasks_and_flows() -> dict[str, Task | Flow]:
    found: dict[str, Task | Flow] = {}
    for package in (prefect_orthanc.tasks, prefect_orthanc.flows):
        names = [package.__name__] + [info.name for info in pkgutil.walk_packages(
            package.__path__, package.__name__ + ".")]
        for name in names:
            module = importlib.import_module(name)
            for attribute in getattr(module, "__all__", ()):
                obj = getattr(module, attribute)
                if isinstance(obj, Task | Flow):
                    found[f"{obj.fn.__module__}.{obj.fn.__qualname__}"] = obj
    return found


def sections(doc: str) -> dict[str, list[str]]:
    """Google-style sections of a docstring: title -> its indented lines."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in inspect.cleandoc(doc).splitlines():
        match = _SECTION.match(line)
        if match:
            current = found.setdefault(match.group(1), [])
        elif current is not None and (line.startswith(" ") or not line):
            current.append(line)
        else:
            current = None
    return found


def problems(obj: Task | Flow) -> list[str]:
    doc = sections(obj.fn.__doc__ or "")
    signature = inspect.signature(obj.fn)
    missing = []
    documented = {m.group(1) for line in doc.get("Args", []) if (m := _ITEM.match(line))}
    undocumented = [name for name in signature.parameters if name not in documented]
    if undocumented:
        missing.append(f"Args for {', '.join(undocumented)}")
    if signature.return_annotation not in ("None", None) and "Returns" not in doc:
        missing.append("Returns")
    if "Raises" not in doc:
        missing.append("Raises")
    if not {"Example", "Examples"} & doc.keys():
        missing.append("Example")
    return missing


def test_the_audit_finds_the_public_tasks_and_flows():
    found = public_tasks_and_flows()
    assert "prefect_orthanc.flows.collection.collect_cohort" in found
    assert "prefect_orthanc.tasks.network.query_modality" in found
    assert sum(isinstance(obj, Flow) for obj in found.values()) >= 5


def test_the_audit_reports_what_a_docstring_lacks():
    from prefect import task

    @task
    def undocumented(credentials: str, study_id: str) -> int:
        """Count something.

        Args:
            credentials: Where.
        """
        return 0

    assert problems(undocumented) == ["Args for study_id", "Returns", "Raises", "Example"]


def test_every_public_task_and_flow_documents_args_returns_raises_and_an_example():
    lacking = {name: missing for name, obj in sorted(public_tasks_and_flows().items())
               if (missing := problems(obj))}
    assert not lacking, "docstrings lacking sections (team standard: shapes, units, errors, " \
        "a short example): " + "; ".join(f"{name}: {', '.join(m)}"
                                         for name, m in lacking.items())
