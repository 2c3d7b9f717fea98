"""Every Orthanc operation, written once.

Each public method here is an ``@operation``: a generator of request steps (see ``core``).
Reached through ``Orthanc`` it runs with blocking I/O and returns the value; reached through
``AsyncOrthanc`` it returns an awaitable. Type checkers see the right signature on both.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar, overload
from urllib.parse import quote

from prefect_orthanc.orthanc_client import core
from prefect_orthanc.orthanc_client.core import Call, Steps
from prefect_orthanc.orthanc_client.errors import (
    OrthancConflict,
    OrthancJobFailed,
    OrthancJobLost,
    OrthancJobTimeout,
    OrthancNotFound,
    OrthancUnsupported,
    OrthancUsageError,
    redact,
)
from prefect_orthanc.orthanc_client.models import (
    ArchiveResult,
    ChangesPage,
    JobInfo,
    JobState,
    Level,
    ModifyResult,
    QueryAnswer,
    QueryResult,
    Resource,
    ResourceStatistics,
    SystemInfo,
    UploadResult,
)
from prefect_orthanc.orthanc_client.retrieval import (
    ExpectedCount,
    RetrieveResult,
    Settle,
    expected_instances,
    retrieve_study,
)
from prefect_orthanc.orthanc_client.settings import OrthancConnection

if TYPE_CHECKING:
    from prefect_orthanc.orthanc_client.client import AsyncOrthanc, Orthanc

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

LABELS_SINCE = "1.12.0"
_UNKNOWN_RESOURCE = 17  # Orthanc's error code for a missing resource (vs a missing item in it)
_OVERWRITE_ATTEMPTS = 5


class _Composable(Protocol[P, R_co]):
    """What an operation bound to any client has: its step generator, for composing."""

    @property
    def steps(self) -> Callable[P, Steps[R_co]]: ...


class _Bound(_Composable[P, R_co], Protocol[P, R_co]):
    """An operation bound to ``Orthanc``: a blocking method."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...


class _AsyncBound(_Composable[P, R_co], Protocol[P, R_co]):
    """An operation bound to ``AsyncOrthanc``: a coroutine method."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R_co]: ...


class operation(Generic[P, R]):
    """Expose a step-generator as a blocking method on ``Orthanc`` and a coroutine on
    ``AsyncOrthanc``."""

    def __init__(self, steps: Callable[Concatenate[Any, P], Steps[R]]) -> None:
        self.steps = steps  # the raw generator, for composing operations inside this module
        functools.update_wrapper(self, steps)  # type: ignore[arg-type]

    @overload
    def __get__(self, obj: None, owner: type) -> operation[P, R]: ...
    @overload
    def __get__(self, obj: Orthanc, owner: type) -> _Bound[P, R]: ...
    @overload
    def __get__(self, obj: AsyncOrthanc, owner: type) -> _AsyncBound[P, R]: ...
    @overload
    def __get__(self, obj: Operations, owner: type) -> _Composable[P, R]: ...
    def __get__(self, obj: Any, owner: type) -> Any:
        if obj is None:
            return self
        steps = self.steps

        @functools.wraps(steps)
        def bound(*args: Any, **kwargs: Any) -> Any:
            return obj._run(steps(obj, *args, **kwargs))

        bound.steps = functools.partial(steps, obj)  # type: ignore[attr-defined]
        return bound


#: the check ``dicom_gate`` installs for the current context (thread, task, coroutine)
_DICOM_GATE: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "orthanc_dicom_gate", default=None)


@contextlib.contextmanager
def dicom_gate(check: Callable[[str], None]) -> Iterator[None]:
    """Call ``check(route)`` before every request, by any client in this context, that makes
    Orthanc start a DICOM exchange with a remote modality: C-ECHO, C-FIND, C-MOVE, C-STORE
    (a ``POST`` under ``/modalities/{name}/`` or ``/queries/{id}/``; reading a query's
    answers or Orthanc's modality list is not one). ``check`` raises to refuse the exchange;
    nothing is sent then. The gate follows the context: Prefect's thread-pool task runner
    copies it into the tasks a flow submits.

    >>> with dicom_gate(lambda route: refuse_outside_hours()):
    ...     orthanc.query("pacs", "Study", {"PatientID": "X"})
    """
    token = _DICOM_GATE.set(check)
    try:
        yield
    finally:
        _DICOM_GATE.reset(token)


def _seg(value: str) -> str:
    """Quote one path segment (an Orthanc ID, a modality or label name)."""
    return quote(str(value), safe="")


class Operations:
    """The operations shared by both clients. Not used directly: see ``Orthanc``."""

    settings: OrthancConnection
    _system: SystemInfo | None = None

    # ------------------------------------------------------------ plumbing

    def _policy(self) -> core.RetryPolicy:
        return core.RetryPolicy(retries=self.settings.retries, base=self.settings.backoff)

    def _call(self, call: Call) -> Steps[Any]:
        gate = _DICOM_GATE.get()
        if gate is not None and call.method == "POST" and call.route.startswith(
                core._DICOM_ROUTES):
            gate(call.route)  # the one place every DICOM exchange passes
        return core.request(call, self._policy(), self.settings.safe_url,
                            self.settings.credentials_source)

    def _get(self, path: str, route: str, params: Mapping[str, str] | None = None,
             expect: core.Expect = "json") -> Steps[Any]:
        return self._call(Call("GET", path, route, params=params, safe=True, expect=expect))

    def _post(self, path: str, route: str, body: Any = None, *, safe: bool = False,
              long: bool = False, expect: core.Expect = "json") -> Steps[Any]:
        return self._call(Call("POST", path, route, json={} if body is None else body,
                               safe=safe, long=long, expect=expect))

    def _resource_path(self, level: Level | str, resource_id: str) -> tuple[str, str]:
        level = Level(level)
        return f"/{level.collection}/{_seg(resource_id)}", f"/{level.collection}/{{id}}"

    def _require(self, feature: str, version: str) -> Steps[SystemInfo]:
        info = yield from self._system_info()
        if not info.at_least(version):
            raise OrthancUnsupported(
                f"{feature} needs Orthanc >= {version}; this server runs {info.version} "
                f"(ApiVersion {info.api_version})",
                feature=feature, server_version=info.version, required_version=version,
            )
        return info

    def _system_info(self) -> Steps[SystemInfo]:
        if self._system is None:
            self._system = SystemInfo.model_validate((yield from self._get("/system", "/system")))
        return self._system

    # ------------------------------------------------------------ system

    @operation
    def system(self) -> Steps[SystemInfo]:
        """``GET /system``: version, API version, AET. Cached per client for feature detection."""
        self._system = None
        return (yield from self._system_info())

    @operation
    def system_info(self) -> Steps[SystemInfo]:
        """``GET /system`` read once per client (``system()`` reads it again): for feature
        detection, e.g. ``orthanc.system_info().supports_labels``."""
        return (yield from self._system_info())

    @operation
    def statistics(self) -> Steps[dict[str, Any]]:
        """``GET /statistics``: server-wide counts and disk usage."""
        return (yield from self._get("/statistics", "/statistics"))

    @operation
    def request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                json: Any = None, content: bytes | None = None, expect: core.Expect = "json",
                safe: bool = False, long: bool = False) -> Steps[Any]:
        """Any other route, through the same retry and error handling (``route`` = ``path``).

        ``safe=True`` allows retries: only for calls that do not start work.
        """
        route = path.split("?", 1)[0]
        return (yield from self._call(Call(method.upper(), path, route, params=params, json=json,
                                           content=content, expect=expect, safe=safe, long=long)))

    # ------------------------------------------------------------ local resources

    def _find_pages(self, level: Level | str, query: Mapping[str, str], expand: bool,
                    case_sensitive: bool, labels: Sequence[str], page_size: int,
                    limit: int | None) -> Steps[list[Any]]:
        level = Level(level)
        if labels:
            yield from self._require("finding by label", LABELS_SINCE)
        found: list[Any] = []
        while limit is None or len(found) < limit:
            want = page_size if limit is None else min(page_size, limit - len(found))
            body: dict[str, Any] = {"Level": level.value, "Query": dict(query), "Expand": expand,
                                    "CaseSensitive": case_sensitive, "Since": len(found),
                                    "Limit": want}
            if labels:
                body["Labels"] = list(labels)
            page = yield from self._post("/tools/find", "/tools/find", body, safe=True)
            if not page:  # the server may return fewer than asked (its own cap): stop only on empty
                break
            found.extend(page)
        return found

    @operation
    def find(self, level: Level | str, query: Mapping[str, str] | None = None, *,
             case_sensitive: bool = True, labels: Sequence[str] = (), page_size: int = 1000,
             limit: int | None = None) -> Steps[list[str]]:
        """Orthanc IDs of local resources matching ``query`` (``/tools/find``), all pages.

        Pages advance by the number of results actually returned and stop on an empty page,
        so a server-side cap (``LimitFindResults``) never truncates the answer.

        >>> orthanc.find("Study", {"StudyDate": "20240101-20241231", "ModalitiesInStudy": "CT"})
        """
        return (yield from self._find_pages(level, query or {}, False, case_sensitive, labels,
                                            page_size, limit))

    @operation
    def find_resources(self, level: Level | str, query: Mapping[str, str] | None = None, *,
                       case_sensitive: bool = True, labels: Sequence[str] = (),
                       page_size: int = 500, limit: int | None = None) -> Steps[list[Resource]]:
        """Like ``find`` but returns expanded summaries (one request per page, not per result)."""
        pages = yield from self._find_pages(level, query or {}, True, case_sensitive, labels,
                                            page_size, limit)
        return [Resource.from_orthanc(item) for item in pages]

    @operation
    def bulk_resources(self, level: Level | str, resource_ids: Sequence[str], *,
                       metadata: bool = False, page_size: int = 500) -> Steps[list[Resource]]:
        """Summaries of many resources of one level, ``page_size`` per request
        (``POST /tools/bulk-content``, Orthanc >= 1.9.4), with their metadata when asked
        (``Resource.metadata``): one request per page instead of one per resource. IDs
        unknown to the server are left out of the answer."""
        level = Level(level)
        ids = list(resource_ids)
        found: list[Resource] = []
        for start in range(0, len(ids), page_size):
            page = yield from self._post("/tools/bulk-content", "/tools/bulk-content",
                                         {"Resources": ids[start:start + page_size],
                                          "Level": level.value, "Metadata": metadata},
                                         safe=True)
            found.extend(Resource.from_orthanc(item) for item in page or ())
        return found

    @operation
    def resource(self, level: Level | str, resource_id: str) -> Steps[Resource]:
        """The summary of one resource (``GET /studies/{id}`` etc.)."""
        path, route = self._resource_path(level, resource_id)
        return Resource.from_orthanc((yield from self._get(path, route)))

    @operation
    def exists(self, level: Level | str, resource_id: str) -> Steps[bool]:
        """Whether a resource exists locally."""
        path, route = self._resource_path(level, resource_id)
        try:
            yield from self._get(path, route)
        except OrthancNotFound:
            return False
        return True

    @operation
    def children(self, level: Level | str, resource_id: str) -> Steps[list[Resource]]:
        """The resources one level below (a study's series, a series' instances...)."""
        level = Level(level)
        if level.child is None:
            raise OrthancUsageError("instances have no children")
        path, route = self._resource_path(level, resource_id)
        child = level.child.collection
        items = yield from self._get(f"{path}/{child}", f"{route}/{child}")
        return [Resource.from_orthanc(item) for item in items]

    @operation
    def parent(self, level: Level | str, resource_id: str) -> Steps[Resource]:
        """The resource one level above (a series' study...)."""
        level = Level(level)
        if level.parent is None:
            raise OrthancUsageError("patients have no parent")
        path, route = self._resource_path(level, resource_id)
        name = level.parent.value.lower()
        return Resource.from_orthanc((yield from self._get(f"{path}/{name}", f"{route}/{name}")))

    @operation
    def instances(self, level: Level | str, resource_id: str) -> Steps[list[str]]:
        """Orthanc IDs of every instance below a resource."""
        level = Level(level)
        if level is Level.INSTANCE:
            return [resource_id]
        path, route = self._resource_path(level, resource_id)
        items = yield from self._get(f"{path}/instances", f"{route}/instances")
        return [item["ID"] for item in items]

    @operation
    def statistics_of(self, level: Level | str, resource_id: str) -> Steps[ResourceStatistics]:
        """Instance/series counts and disk size below a resource (``/{level}/{id}/statistics``)."""
        level = Level(level)
        if level is Level.INSTANCE:
            raise OrthancUsageError("statistics are per patient, study or series")
        path, route = self._resource_path(level, resource_id)
        payload = yield from self._get(f"{path}/statistics", f"{route}/statistics")
        return ResourceStatistics.model_validate(payload)

    @operation
    def count_instances(self, level: Level | str, resource_id: str) -> Steps[int]:
        """How many instances Orthanc holds below a resource (0 if it does not exist)."""
        level = Level(level)
        if level is Level.INSTANCE:
            return 1 if (yield from self.exists.steps(level, resource_id)) else 0
        try:
            stats = yield from self.statistics_of.steps(level, resource_id)
        except OrthancNotFound:
            return 0
        return stats.count_instances

    @operation
    def tags(self, level: Level | str, resource_id: str, *, shared: bool = False,
             simplify: bool = True) -> Steps[dict[str, Any]]:
        """DICOM tags of an instance, or the tags shared by every instance below a resource.

        Values are patient data: never log them, never return them from a cached task.
        """
        level = Level(level)
        path, route = self._resource_path(level, resource_id)
        if level is not Level.INSTANCE and not shared:
            raise OrthancUsageError("tags of a study/series are its shared tags: pass shared=True")
        suffix = "shared-tags" if shared else "tags"
        params = {"simplify": ""} if simplify else None
        return (yield from self._get(f"{path}/{suffix}", f"{route}/{suffix}", params))

    @operation
    def instance_file(self, instance_id: str) -> Steps[bytes]:
        """The DICOM file of one instance."""
        path, route = self._resource_path(Level.INSTANCE, instance_id)
        return (yield from self._get(f"{path}/file", f"{route}/file", expect="bytes"))

    @operation
    def upload(self, data: bytes | Path) -> Steps[list[UploadResult]]:
        """Store one DICOM file or a ZIP of them (``POST /instances``). Never retried.

        Storing an instance already present answers ``AlreadyStored``, not an error.
        """
        content = Path(data).read_bytes() if isinstance(data, (str, Path)) else data
        answer = yield from self._call(Call("POST", "/instances", "/instances", content=content,
                                            headers={"Content-Type": "application/dicom"},
                                            long=True))
        items = answer if isinstance(answer, list) else [answer]
        return [UploadResult.model_validate(item) for item in items]

    @operation
    def delete(self, level: Level | str, resource_id: str, *,
               missing_ok: bool = False) -> Steps[bool]:
        """Delete one resource and everything below it. Returns False if it was already gone."""
        path, route = self._resource_path(level, resource_id)
        try:
            yield from self._call(Call("DELETE", path, route, safe=True))
        except OrthancNotFound:
            if missing_ok:
                return False
            raise
        return True

    @operation
    def delete_many(self, resource_ids: Iterable[str]) -> Steps[int]:
        """Delete many resources of any level in one call (``/tools/bulk-delete``)."""
        ids = list(resource_ids)
        if ids:
            yield from self._post("/tools/bulk-delete", "/tools/bulk-delete",
                                  {"Resources": ids}, safe=True, expect="none")
        return len(ids)

    # ------------------------------------------------------------ metadata and labels

    def _metadata_value(self, level: Level | str, resource_id: str, name: str,
                        expect: core.Expect) -> Steps[Any]:
        path, route = self._resource_path(level, resource_id)
        try:
            return (yield from self._get(f"{path}/metadata/{_seg(name)}",
                                         f"{route}/metadata/{{name}}", expect=expect))
        except OrthancNotFound as error:
            # 1.10.1 answers an unset name with a bare 404 (newer ones with "inexistent item");
            # only "unknown resource" means the resource itself is missing.
            if error.orthanc_status == _UNKNOWN_RESOURCE:
                raise
            return None

    @operation
    def metadata(self, level: Level | str, resource_id: str, name: str) -> Steps[str | None]:
        """One metadata value, or None if unset. Custom names must be declared in Orthanc's
        ``UserMetadata`` configuration (Orthanc < 1.12 refuses undeclared names)."""
        return (yield from self._metadata_value(level, resource_id, name, "text"))

    @operation
    def metadata_entry(self, level: Level | str, resource_id: str,
                       name: str) -> Steps[tuple[str, str | None] | None]:
        """One metadata value with its ``ETag`` (for a conditional ``set_metadata``), or None
        if unset. Orthanc >= 1.9.2 sends the ETag (revision and MD5 of the value)."""
        return (yield from self._metadata_value(level, resource_id, name, "etag"))

    @operation
    def all_metadata(self, level: Level | str, resource_id: str) -> Steps[dict[str, str]]:
        """Every metadata value of a resource, by name (``GET .../metadata?expand``)."""
        path, route = self._resource_path(level, resource_id)
        return dict((yield from self._get(f"{path}/metadata", f"{route}/metadata",
                                          params={"expand": ""})) or {})

    @operation
    def set_metadata(self, level: Level | str, resource_id: str, name: str, value: str, *,
                     if_match: str | None = None, if_absent: bool = False) -> Steps[None]:
        """Set one metadata value.

        Without ``if_match`` the value is overwritten (idempotent), also on servers that
        check revisions (``CheckRevisions: true`` refuses a write to an existing value that
        names no revision: the current ETag is read and the write repeated). With
        ``if_match`` (an ETag from ``metadata_entry``) the write happens only if the value
        is still the one read, else ``OrthancConflict``: a compare-and-set, which Orthanc
        1.10.1 honours whatever ``CheckRevisions`` says. ``if_absent`` writes a value read as
        unset: a server with ``CheckRevisions: true`` answers ``OrthancConflict`` when another
        writer set it meanwhile; other servers overwrite (read back to be sure).
        """
        yield from self._metadata_write("PUT", level, resource_id, name, value.encode(),
                                        if_match=if_match,
                                        strict=if_match is not None or if_absent)

    @operation
    def delete_metadata(self, level: Level | str, resource_id: str, name: str) -> Steps[None]:
        """Remove one metadata value (idempotent), also on servers that check revisions
        (``CheckRevisions: true`` refuses a delete that names no revision: the current ETag is
        read and the delete repeated)."""
        yield from self._metadata_write("DELETE", level, resource_id, name, None,
                                        if_match=None, strict=False)

    def _metadata_write(self, method: str, level: Level | str, resource_id: str, name: str,
                        content: bytes | None, *, if_match: str | None,
                        strict: bool) -> Steps[None]:
        """PUT or DELETE one metadata value, naming the revision ``if_match`` (if any). On a
        conflict (a stale revision, or ``CheckRevisions: true`` refusing a write that names
        none): raise when ``strict`` (a compare-and-set), else read the current ETag and repeat,
        ``_OVERWRITE_ATTEMPTS`` times at most. A DELETE of a value already gone is done."""
        path, route = self._resource_path(level, resource_id)
        url, template = f"{path}/metadata/{_seg(name)}", f"{route}/metadata/{{name}}"
        etag = if_match
        for _ in range(_OVERWRITE_ATTEMPTS):
            try:
                yield from self._call(Call(method, url, template, content=content,
                                           headers={"If-Match": etag} if etag else None,
                                           safe=True, expect="none"))
                return
            except OrthancConflict:
                if strict:
                    raise
            current = yield from self.metadata_entry.steps(level, resource_id, name)
            if current is None and method == "DELETE":
                return  # already gone
            etag = current[1] if current else None
        done = "overwritten" if method == "PUT" else "deleted"
        raise OrthancConflict(f"{method} {template} failed: the value kept changing while it "
                              f"was {done} ({_OVERWRITE_ATTEMPTS} attempts)", method=method,
                              route=template, status_code=409, orthanc_status=None,
                              orthanc_error=None, details=None)

    @operation
    def labels(self, level: Level | str, resource_id: str) -> Steps[list[str]]:
        """Labels of a resource (Orthanc >= 1.12.0; older servers raise OrthancUnsupported)."""
        yield from self._require("labels", LABELS_SINCE)
        path, route = self._resource_path(level, resource_id)
        return (yield from self._get(f"{path}/labels", f"{route}/labels"))

    @operation
    def add_label(self, level: Level | str, resource_id: str, label: str) -> Steps[None]:
        """Attach a label (Orthanc >= 1.12.0)."""
        yield from self._label("PUT", level, resource_id, label)

    @operation
    def remove_label(self, level: Level | str, resource_id: str, label: str) -> Steps[None]:
        """Detach a label (Orthanc >= 1.12.0)."""
        yield from self._label("DELETE", level, resource_id, label)

    def _label(self, method: str, level: Level | str, resource_id: str,
               label: str) -> Steps[None]:
        yield from self._require("labels", LABELS_SINCE)
        path, route = self._resource_path(level, resource_id)
        yield from self._call(Call(method, f"{path}/labels/{_seg(label)}",
                                   f"{route}/labels/{{label}}", content=b"", safe=True,
                                   expect="none"))

    # ------------------------------------------------------------ anonymize / modify

    def _alter(self, action: str, level: Level | str, resource_id: str, *,
               replace: Mapping[str, Any] | None, keep: Sequence[str], remove: Sequence[str],
               force: bool, keep_private_tags: bool, keep_source: bool,
               dicom_version: str | None, priority: int, options: Mapping[str, Any] | None,
               asynchronous: bool) -> Steps[Any]:
        level = Level(level)
        if level is Level.INSTANCE:
            raise OrthancUsageError(f"{action} an instance returns a file, not a resource: use "
                             f"request('POST', '/instances/<id>/{action}', expect='bytes')")
        body: dict[str, Any] = {"Replace": dict(replace or {}), "Keep": list(keep),
                                "Remove": list(remove), "Force": force,
                                "KeepPrivateTags": keep_private_tags, "KeepSource": keep_source,
                                "Priority": priority}
        if dicom_version:
            body["DicomVersion"] = dicom_version
        body.update(options or {})
        if asynchronous:
            body["Asynchronous"] = True
        else:
            body["Synchronous"] = True
        path, route = self._resource_path(level, resource_id)
        return (yield from self._post(f"{path}/{action}", f"{route}/{action}", body,
                                      long=not asynchronous))

    @operation
    def anonymize(self, level: Level | str, resource_id: str, *,
                  replace: Mapping[str, Any] | None = None, keep: Sequence[str] = (),
                  remove: Sequence[str] = (), force: bool = False,
                  keep_private_tags: bool = False, keep_source: bool = True,
                  dicom_version: str | None = None, priority: int = 0,
                  options: Mapping[str, Any] | None = None,
                  asynchronous: bool = True) -> Steps[str | ModifyResult]:
        """Anonymize a patient/study/series with Orthanc's Basic Profile plus your rules.

        With ``asynchronous=True`` (default) returns the Orthanc job ID: wait for it with
        ``wait_for_job`` and read the new resource with ``modified_resource``. With False,
        blocks (long timeout) and returns the new resource. ``force`` is needed to replace
        PatientID or UIDs.
        """
        answer = yield from self._alter("anonymize", level, resource_id, replace=replace,
                                        keep=keep, remove=remove, force=force,
                                        keep_private_tags=keep_private_tags,
                                        keep_source=keep_source, dicom_version=dicom_version,
                                        priority=priority, options=options,
                                        asynchronous=asynchronous)
        return answer["ID"] if asynchronous else ModifyResult.model_validate(answer)

    @operation
    def modify(self, level: Level | str, resource_id: str, *,
               replace: Mapping[str, Any] | None = None, keep: Sequence[str] = (),
               remove: Sequence[str] = (), force: bool = False,
               keep_private_tags: bool = True, keep_source: bool = True,
               priority: int = 0, options: Mapping[str, Any] | None = None,
               asynchronous: bool = True) -> Steps[str | ModifyResult]:
        """Modify tags of a patient/study/series; same contract as ``anonymize``."""
        answer = yield from self._alter("modify", level, resource_id, replace=replace, keep=keep,
                                        remove=remove, force=force,
                                        keep_private_tags=keep_private_tags,
                                        keep_source=keep_source, dicom_version=None,
                                        priority=priority, options=options,
                                        asynchronous=asynchronous)
        return answer["ID"] if asynchronous else ModifyResult.model_validate(answer)

    @staticmethod
    def modified_resource(job: JobInfo) -> ModifyResult:
        """The resource an anonymize/modify job created (its ``Content.ID``)."""
        if job.state is not JobState.SUCCESS or "ID" not in job.content:
            raise OrthancUsageError(
                f"job {job.id} has no result resource (state {job.state.value})")
        return ModifyResult.model_validate({**job.content, "job_id": job.id})

    # ------------------------------------------------------------ archives

    def _download(self, call: Call, dest: Path) -> Steps[ArchiveResult]:
        return core.download(call, Path(dest), self._policy(), self.settings.safe_url,
                             self.settings.credentials_source)

    @operation
    def download_resource_archive(self, level: Level | str, resource_id: str,
                                  dest: Path | str, *, media: bool = False
                                  ) -> Steps[ArchiveResult]:
        """Stream one resource's ZIP (``GET /{level}/{id}/archive``, or ``/media`` with a
        DICOMDIR) to ``dest``: one synchronous request (``download_archive`` for many
        resources or big ones, through an Orthanc job).

        Memory stays flat whatever the size; the file appears only when complete.
        """
        path, route = self._resource_path(level, resource_id)
        kind = "media" if media else "archive"
        call = Call("GET", f"{path}/{kind}", f"{route}/{kind}", safe=True, long=True)
        return (yield from self._download(call, Path(dest)))

    @operation
    def archive_job(self, resource_ids: Sequence[str], *, media: bool = False,
                    priority: int = 0) -> Steps[str]:
        """Start an archive job over many resources; returns the job ID (for large sets)."""
        kind = "media" if media else "archive"
        answer = yield from self._post(f"/tools/create-{kind}", f"/tools/create-{kind}",
                                       {"Resources": list(resource_ids), "Synchronous": False,
                                        "Priority": priority})
        return answer["ID"]

    @operation
    def download_job_archive(self, job_id: str, dest: Path | str) -> Steps[ArchiveResult]:
        """Stream the ZIP produced by a finished archive job to ``dest``."""
        call = Call("GET", f"/jobs/{_seg(job_id)}/archive", "/jobs/{id}/archive", safe=True,
                    long=True)
        return (yield from self._download(call, Path(dest)))

    @operation
    def download_archive(self, resource_ids: Sequence[str], dest: Path | str, *,
                         media: bool = False, timeout: float | None = None
                         ) -> Steps[ArchiveResult]:
        """ZIP resources of any level through an archive job (``POST /tools/create-archive``:
        no HTTP timeout on big sets), wait for it (``timeout`` seconds), then stream the ZIP to
        ``dest``; the task ``tasks.download_archive`` is this operation."""
        job_id = yield from self.archive_job.steps(resource_ids, media=media)
        yield from self.wait_for_job.steps(job_id, timeout=timeout)
        return (yield from self.download_job_archive.steps(job_id, dest))

    # ------------------------------------------------------------ jobs

    @operation
    def job(self, job_id: str) -> Steps[JobInfo]:
        """The state of one job (``GET /jobs/{id}``)."""
        try:
            return JobInfo.model_validate(
                (yield from self._get(f"/jobs/{_seg(job_id)}", "/jobs/{id}")))
        except OrthancNotFound:
            raise OrthancJobLost(
                f"job {job_id} is not known to Orthanc (finished jobs beyond JobsHistorySize "
                f"are forgotten)", job_id=job_id) from None

    @operation
    def jobs(self) -> Steps[list[JobInfo]]:
        """Every job Orthanc remembers (``GET /jobs?expand``): those not ended and the last
        ``JobsHistorySize`` ended ones. Their ``content`` can hold DICOM values (a C-MOVE
        job's query): keep it in memory, ``JobInfo.redacted()`` before logging anything."""
        return [JobInfo.model_validate(job)
                for job in (yield from self._get("/jobs", "/jobs", params={"expand": ""}))]

    @operation
    def wait_for_job(self, job_id: str, *, timeout: float | None = None, interval: float = 0.1,
                     max_interval: float = 2.0) -> Steps[JobInfo]:
        """Poll a job until Success (returned) or Failure (raised), within ``timeout`` seconds.

        Polling starts at ``interval`` and backs off x1.5 up to ``max_interval``. The default
        timeout is the client's long timeout. Raises ``OrthancJobFailed``,
        ``OrthancJobTimeout`` (the job keeps running in Orthanc) or ``OrthancJobLost``.
        """
        limit = self.settings.long_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        delay = interval
        while True:
            info = yield from self.job.steps(job_id)
            if info.state is JobState.SUCCESS:
                return info
            if info.state is JobState.FAILURE:
                raise OrthancJobFailed(
                    f"job {job_id} ({info.type}) failed: {info.error_description or 'no reason'} "
                    f"(Orthanc error {info.error_code})",
                    job_id=job_id, job_type=info.type, error_code=info.error_code,
                    error_description=info.error_description,
                    error_details=redact(info.error_details),
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OrthancJobTimeout(
                    f"job {job_id} ({info.type}) still {info.state.value} at {info.progress}% "
                    f"after {limit:g} s", job_id=job_id, timeout=limit,
                    state=info.state.value, progress=info.progress,
                )
            yield core.Sleep(min(delay, remaining))
            delay = min(delay * 1.5, max_interval)

    def _job_action(self, job_id: str, action: str, safe: bool) -> Steps[None]:
        yield from self._post(f"/jobs/{_seg(job_id)}/{action}", f"/jobs/{{id}}/{action}",
                              safe=safe, expect="none")

    @operation
    def cancel_job(self, job_id: str) -> Steps[None]:
        yield from self._job_action(job_id, "cancel", safe=True)

    @operation
    def pause_job(self, job_id: str) -> Steps[None]:
        yield from self._job_action(job_id, "pause", safe=True)

    @operation
    def resume_job(self, job_id: str) -> Steps[None]:
        yield from self._job_action(job_id, "resume", safe=True)

    @operation
    def resubmit_job(self, job_id: str) -> Steps[None]:
        """Run a failed job again (starts work: never retried automatically)."""
        yield from self._job_action(job_id, "resubmit", safe=False)

    # ------------------------------------------------------------ DICOM networking

    @operation
    def modalities(self) -> Steps[list[str]]:
        """Names of the DICOM modalities this Orthanc knows."""
        return (yield from self._get("/modalities", "/modalities"))

    @operation
    def modality_configuration(self, modality: str) -> Steps[dict[str, Any]]:
        """How this Orthanc reaches ``modality`` (``GET /modalities/{name}/configuration``:
        ``AET``, ``Host``, ``Port``...)."""
        return (yield from self._get(f"/modalities/{_seg(modality)}/configuration",
                                     "/modalities/{name}/configuration"))

    @operation
    def echo(self, modality: str, *, timeout: int | None = None) -> Steps[None]:
        """C-ECHO a modality; raises ``OrthancDimseError`` if it does not answer."""
        body = {"Timeout": timeout} if timeout else {}
        yield from self._post(f"/modalities/{_seg(modality)}/echo", "/modalities/{name}/echo",
                              body, safe=True, expect="none")

    @operation
    def query(self, modality: str, level: Level | str, query: Mapping[str, str], *,
              timeout: int | None = None) -> Steps[QueryResult]:
        """C-FIND on a modality; returns the query ID (to retrieve from) and every answer.

        Ask for extra return keys by sending them empty, e.g. ``{"NumberOfStudyRelatedInstances":
        ""}``. Answers are simplified to DICOM keywords.
        """
        level = Level(level)
        body: dict[str, Any] = {"Level": level.value, "Query": dict(query)}
        if timeout:
            body["Timeout"] = timeout
        answer = yield from self._post(f"/modalities/{_seg(modality)}/query",
                                       "/modalities/{name}/query", body, safe=True, long=True)
        query_id = answer["ID"]
        items = yield from self._get(f"/queries/{_seg(query_id)}/answers",
                                     "/queries/{id}/answers", {"expand": "", "simplify": ""})
        return QueryResult(query_id=query_id, modality=modality, level=level,
                           answers=tuple(QueryAnswer(index=i, tags=tags)
                                         for i, tags in enumerate(items)))

    @operation
    def retrieve(self, query_id: str, target_aet: str, *, answer: int | None = None,
                 priority: int = 0) -> Steps[str]:
        """C-MOVE the answers of a query (all, or one) to ``target_aet`` as a job; returns its ID.

        This is the asynchronous route on Orthanc 1.10.1 (``/modalities/{id}/move`` blocks).
        """
        path = f"/queries/{_seg(query_id)}"
        route = "/queries/{id}"
        if answer is not None:
            path, route = f"{path}/answers/{answer}", f"{route}/answers/{{index}}"
        reply = yield from self._post(f"{path}/retrieve", f"{route}/retrieve",
                                      {"TargetAet": target_aet, "Synchronous": False,
                                       "Priority": priority})
        return reply["ID"]

    @operation
    def delete_query(self, query_id: str) -> Steps[None]:
        """Forget a query and its answers on the Orthanc side."""
        yield from self._call(Call("DELETE", f"/queries/{_seg(query_id)}", "/queries/{id}",
                                   safe=True, expect="none"))

    @operation
    def move(self, modality: str, level: Level | str, identifiers: Sequence[Mapping[str, str]],
             target_aet: str, *, timeout: int | None = None) -> Steps[None]:
        """Synchronous C-MOVE (blocks until done, long HTTP timeout). Prefer ``retrieve``."""
        body: dict[str, Any] = {"Level": Level(level).value,
                                "Resources": [dict(item) for item in identifiers],
                                "TargetAet": target_aet, "Synchronous": True}
        if timeout:
            body["Timeout"] = timeout
        yield from self._post(f"/modalities/{_seg(modality)}/move", "/modalities/{name}/move",
                              body, long=True, expect="none")

    def _send(self, kind: str, name: str, resource_ids: Sequence[str],
              synchronous: bool) -> Steps[str | None]:
        answer = yield from self._post(
            f"/{kind}/{_seg(name)}/store", f"/{kind}/{{name}}/store",
            {"Resources": list(resource_ids), "Synchronous": synchronous},
            long=synchronous)
        return None if synchronous else answer["ID"]

    @operation
    def store(self, modality: str, resource_ids: Sequence[str], *,
              synchronous: bool = False) -> Steps[str | None]:
        """C-STORE resources to a modality; returns the job ID (None when synchronous)."""
        return (yield from self._send("modalities", modality, resource_ids, synchronous))

    @operation
    def peers(self) -> Steps[list[str]]:
        """Names of the Orthanc peers this Orthanc knows."""
        return (yield from self._get("/peers", "/peers"))

    @operation
    def store_peer(self, peer: str, resource_ids: Sequence[str], *,
                   synchronous: bool = False) -> Steps[str | None]:
        """Send resources to an Orthanc peer over HTTP; returns the job ID."""
        return (yield from self._send("peers", peer, resource_ids, synchronous))

    @operation
    def retrieve_study(self, modality: str, study_uid: str, *,
                       job_timeout: float | None = None, refetch_rounds: int = 2,
                       settle: Settle | None = None, move_attempts: int = 3,
                       backoff: float = 1.0, adopt_moves: bool = False
                       ) -> Steps[RetrieveResult]:
        """Retrieve a study from ``modality`` into this Orthanc and verify it is complete.

        Counts first (study-level count, else series-level, else IMAGE-level SOP Instance
        UIDs) and moves only what is missing, so calling it again is cheap and moves nothing
        for a complete study. After each C-MOVE, waits for arrivals to settle (``settle``);
        a move that moved nothing is tried again up to ``move_attempts`` times, ``backoff``
        seconds doubling. With ``adopt_moves``, C-MOVE jobs of this study from this modality
        already under way in Orthanc (a run that died left its job running; another run's)
        are waited for first, and only what they did not bring is moved (one ``GET /jobs``
        listing: ask for it when a previous retrieval of the study may not have ended). See
        ``retrieval`` for the algorithm.

        >>> result = orthanc.retrieve_study("pacs", "1.2.840.113619.2.55.3")
        >>> result.outcome, result.expected_instances, result.count_source
        """
        return (yield from retrieve_study(self, modality, study_uid, job_timeout=job_timeout,
                                          refetch_rounds=refetch_rounds, settle=settle,
                                          move_attempts=move_attempts, backoff=backoff,
                                          adopt_moves=adopt_moves))

    @operation
    def expected_instances(self, modality: str, study_uid: str,
                           study_answers: Sequence[Mapping[str, Any]] = ()
                           ) -> Steps[ExpectedCount | None]:
        """How many instances ``modality`` says a study holds, and how that was obtained.

        Uses ``NumberOfStudyRelatedInstances`` from ``study_answers`` (the study-level C-FIND
        answers already at hand) when present, else series-level C-FIND counts, else an
        IMAGE-level C-FIND of each series' SOP Instance UIDs (works on every Q/R SCP).
        None when the PACS lists no series for the study.

        >>> orthanc.expected_instances("pacs", "1.2.840.113619.2.55.3").source
        <CountSource.SERIES: 'series'>
        """
        return (yield from expected_instances(self, modality, study_uid, study_answers))

    # ------------------------------------------------------------ changes

    @operation
    def changes(self, since: int = 0, limit: int = 100) -> Steps[ChangesPage]:
        """One page of the change log after sequence number ``since``."""
        payload = yield from self._get("/changes", "/changes",
                                       {"since": str(since), "limit": str(limit)})
        return ChangesPage.model_validate(payload)
