"""Flows composed from the Orthanc tasks: research collection, de-identified sharing, new-study
routing and the changes watcher."""

from prefect_orthanc.flows import states as _states  # noqa: F401 - installs the purposeful-failure log filter
