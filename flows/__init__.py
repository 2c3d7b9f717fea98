"""Flows composed from the Orthanc tasks: research collection (and, next, de-identified sharing)."""
