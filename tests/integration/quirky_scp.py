"""A small Q/R SCP (pynetdicom) showing PACS behaviours neither Orthanc nor dcmqrscp shows.

``QuirkySCP(files, destinations, **quirks)`` serves C-ECHO, C-FIND (patient and study root, at
STUDY, SERIES and IMAGE level) and C-MOVE over the given DICOM files, answering only the keys
it supports (like dcmqrscp: no instance counts, no ModalitiesInStudy, which it also ignores as
a filter). Quirks, each seen in the field:

* ``answers_per_instance``: a STUDY or SERIES query is answered once per stored instance;
* ``find_cap``: at most that many answers per C-FIND, then Success: a silent cap;
* ``async_store``: the C-MOVE is answered Success at once, and the C-STOREs follow from
  another association, ``store_interval`` seconds apart (as VNAs and cloud archives do);
* ``reject_moves``: the next N associations proposing C-MOVE are rejected (transient, "local
  limit exceeded"), as a PACS out of free associations does (Orthanc 1.10.1 proposes C-MOVE
  on its C-ECHO and C-FIND associations too, so these are rejected as well);
* ``busy_moves``: the next N C-MOVEs fail with 0xA702 (out of resources), nothing sent;
* ``slow_store``: seconds before each C-STORE of a C-MOVE (a slow link: a move lasts long
  enough to outlive the run that asked for it). ``peak_moving`` is the most C-MOVEs it was
  serving at once.

A destination AET not in ``destinations`` is answered 0xA801. ``moves`` counts C-MOVE requests
received, ``finds`` C-FIND requests.
"""

from __future__ import annotations

import fnmatch
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from prefect_orthanc.deployments.lab.servers import free_ports

_MOVE_SYNTAXES = {PatientRootQueryRetrieveInformationModelMove,
                  StudyRootQueryRetrieveInformationModelMove}

#: keys this SCP matches and returns, per level (anything else is dropped, as dcmqrscp does)
SUPPORTED = {
    "PATIENT": ("PatientID", "PatientName"),
    "STUDY": ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "AccessionNumber",
              "StudyDescription"),
    "SERIES": ("SeriesInstanceUID", "Modality", "SeriesNumber"),
    "IMAGE": ("SOPInstanceUID", "InstanceNumber"),
}
_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_UIDS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
         "IMAGE": "SOPInstanceUID"}


def _matches(value: str, wanted: str, keyword: str) -> bool:
    if wanted in ("", "*"):
        return True
    if keyword.endswith("Date") and "-" in wanted:
        start, end = wanted.split("-", 1)
        return bool(value) and (not start or value >= start) and (not end or value <= end)
    if "\\" in wanted:
        return value in wanted.split("\\")
    if "*" in wanted or "?" in wanted:
        return fnmatch.fnmatchcase(value, wanted.replace("[", "[[]"))
    return value == wanted


class QuirkySCP:
    def __init__(self, files: Iterable[str | Path], destinations: Mapping[str, int], *,
                 aet: str = "QUIRKY", answers_per_instance: bool = False,
                 find_cap: int | None = None, async_store: bool = False,
                 store_interval: float = 0.05, reject_moves: int = 0,
                 busy_moves: int = 0, slow_store: float = 0.0) -> None:
        self.aet = aet
        self.destinations = dict(destinations)
        self.answers_per_instance = answers_per_instance
        self.find_cap = find_cap
        self.async_store = async_store
        self.store_interval = store_interval
        self.reject_moves = reject_moves
        self.busy_moves = busy_moves
        self.slow_store = slow_store
        self.moving = self.peak_moving = 0
        self.moves = 0
        self.finds = 0
        self.rejected = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.instances: list[Dataset] = [pydicom.dcmread(path) for path in files]
        self.port = free_ports(1)[0]
        self._ae = self._make_ae()
        self._server: ThreadedAssociationServer | None = None

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.aet)
        for syntax in (Verification, PatientRootQueryRetrieveInformationModelFind,
                       PatientRootQueryRetrieveInformationModelMove,
                       StudyRootQueryRetrieveInformationModelFind,
                       StudyRootQueryRetrieveInformationModelMove):
            ae.add_supported_context(syntax)
        for syntax in (CTImageStorage, MRImageStorage):
            ae.add_requested_context(syntax)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        return ae

    # -- lifecycle

    def start(self) -> QuirkySCP:
        handlers: list[Any] = [(evt.EVT_C_ECHO, lambda event: 0x0000),
                               (evt.EVT_C_FIND, self._on_find), (evt.EVT_C_MOVE, self._on_move),
                               (evt.EVT_REQUESTED, self._on_requested)]
        self._server = self._ae.start_server(("127.0.0.1", self.port), block=False,
                                             evt_handlers=handlers)
        return self

    def stop(self) -> None:
        for thread in self._threads:
            thread.join(timeout=60)
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> QuirkySCP:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_for_stores(self, timeout: float = 60) -> None:
        """Wait until every asynchronous C-STORE has been sent."""
        for thread in list(self._threads):
            thread.join(timeout=timeout)

    # -- handlers

    def _on_requested(self, event: evt.Event) -> None:
        primitive = event.assoc.requestor.primitive  # the A-ASSOCIATE request, when requested
        assert primitive is not None
        proposed = {str(cx.abstract_syntax) for cx in
                    primitive.presentation_context_definition_list}
        with self._lock:
            reject = self.reject_moves > 0 and bool(proposed & _MOVE_SYNTAXES)
            if reject:
                self.reject_moves -= 1
                self.rejected += 1
        if reject:  # rejected transient, by the service provider: local limit exceeded
            event.assoc.acse.send_reject(0x02, 0x03, 0x02)

    def _select(self, identifier: Dataset) -> tuple[str, list[Dataset]]:
        level = str(identifier.get("QueryRetrieveLevel", "STUDY"))
        depth = _LEVELS.index(level)
        filters = {}
        for upper in _LEVELS[:depth + 1]:
            for keyword in SUPPORTED[upper] + (_UIDS[upper],):
                value = identifier.get(keyword)
                if value is not None and str(value) != "":
                    filters[keyword] = str(value)
        found = [ds for ds in self.instances
                 if all(_matches(str(ds.get(k, "")), v, k) for k, v in filters.items())]
        return level, found

    def _answer(self, identifier: Dataset, level: str, instance: Dataset) -> Dataset:
        answer = Dataset()
        answer.QueryRetrieveLevel = level
        depth = _LEVELS.index(level)
        allowed = {k for upper in _LEVELS[:depth + 1] for k in SUPPORTED[upper]}
        allowed |= {_UIDS[upper] for upper in _LEVELS[:depth + 1]}
        for element in identifier:
            keyword = element.keyword
            if keyword in allowed:
                setattr(answer, keyword, instance.get(keyword, ""))
        answer.RetrieveAETitle = self.aet
        return answer

    def _on_find(self, event: evt.Event):
        with self._lock:
            self.finds += 1
        level, found = self._select(event.identifier)
        key = _UIDS[level]
        seen: set[str] = set()
        sent = 0
        for instance in found:
            uid = str(instance.get(key, ""))
            if not self.answers_per_instance and uid in seen:
                continue
            seen.add(uid)
            if self.find_cap is not None and sent >= self.find_cap:
                break  # silent cap: the query still ends in Success
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, self._answer(event.identifier, level, instance)
            sent += 1

    def _on_move(self, event: evt.Event):
        with self._lock:
            self.moves += 1
        destination = event.move_destination
        destination = destination.decode().strip() if isinstance(destination, bytes) \
            else str(destination or "").strip()
        if destination not in self.destinations:
            yield None, None  # pynetdicom answers 0xA801: move destination unknown
            return
        _level, found = self._select(event.identifier)
        port = self.destinations[destination]
        with self._lock:
            busy = self.busy_moves > 0
            self.busy_moves -= busy
        if busy:  # out of resources: unable to perform sub-operations, nothing sent
            yield "127.0.0.1", port
            yield 1
            yield 0xA702, None
            return
        if self.async_store:
            # pynetdicom stops the handler after "0 sub-operations": start the sender first
            thread = threading.Thread(target=self._store_later, args=(destination, port, found),
                                      daemon=True)
            self._threads.append(thread)
            thread.start()
            yield "127.0.0.1", port
            yield 0  # acknowledged at once: the C-STOREs follow from another association
            return
        yield "127.0.0.1", port
        yield len(found)
        with self._lock:
            self.moving += 1
            self.peak_moving = max(self.peak_moving, self.moving)
        try:
            for instance in found:
                if event.is_cancelled:
                    yield 0xFE00, None
                    return
                time.sleep(self.slow_store)
                yield 0xFF00, instance
        finally:
            with self._lock:
                self.moving -= 1

    def _store_later(self, destination: str, port: int, instances: list[Dataset]) -> None:
        ae = AE(ae_title=self.aet)
        for syntax in (CTImageStorage, MRImageStorage):
            ae.add_requested_context(syntax)
        time.sleep(0.5)  # after the C-MOVE response has gone out
        assoc = ae.associate("127.0.0.1", port, ae_title=destination)
        if not assoc.is_established:
            return
        try:
            for instance in instances:
                assoc.send_c_store(instance)
                time.sleep(self.store_interval)
        finally:
            assoc.release()
