"""Flows composed from the Orthanc tasks: research collection, de-identified sharing, new-study
routing and the changes watcher."""

from .logs import install as _install_log_filter

_install_log_filter()
