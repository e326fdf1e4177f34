"""A worker's link to a node it shares no disk with: the node's worker API.

:class:`RemoteLink` is the :class:`~pacs_ai.pipeline.link.JobLink` of a GPU server that has
only the broker URL, the node's URL and a token of role ``worker``. The series arrives as a
WADO-RS multipart body holding exactly the instances a local worker would read, as the node
stored them; the SEG and SR go back one object per PUT, and the node checks that each is the
job's own (deterministic UIDs, SOP Class, the job's study and patient) before it keeps it.

A node out of reach is a :class:`~pacs_ai.errors.NetworkError`: nothing can be recorded, the
job's lease runs out and the reconciler gives the job to a worker again (a bounded number of
times). An error answer from the node is a failed attempt, recorded there.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pacs_ai.errors import NetworkError, NotAVolume, PacsAiError
from pacs_ai.pipeline.jobs import ClaimedJob, Output
from pacs_ai.pipeline.link import LeaseLost
from pacs_ai.pipeline.route import Priority
from pacs_ai.web.dicomweb.multipart import MultipartError, MultipartReader, stow_boundary

logger = logging.getLogger(__name__)

CHUNK = 1 << 20


class NodeRefused(PacsAiError):
    """The node answered with an error (4xx other than 409, or 5xx)."""


@dataclass
class RemoteLink:
    node_url: str
    token: str
    worker: str
    timeout_s: float = 60.0
    # The node says how long a lease lasts when it hands out a job.
    _lease_s: float = field(default=60.0, init=False)

    @property
    def lease_s(self) -> float:
        return self._lease_s

    def claim(self, job_id: int) -> ClaimedJob | None:
        status, answer = self._call("POST", f"/api/worker/jobs/{job_id}/claim", {})
        if status == 409:
            return None
        self._lease_s = float(answer["lease_s"])
        return _job(answer["job"])

    def renew(self, job_id: int) -> bool:
        status, answer = self._call("POST", f"/api/worker/jobs/{job_id}/lease", {})
        return status == 200 and bool(answer.get("renewed"))

    def series(self, job: ClaimedJob) -> list[Dataset]:
        query = urllib.parse.urlencode({"worker": self.worker})
        path = f"/api/worker/jobs/{job.id}/series?{query}"
        datasets: list[Dataset] = []
        try:
            response = self._open("GET", path)
        except urllib.error.HTTPError as exc:
            raise _refusal(exc, "GET", path, held=True) from None
        with response:
            expected = int(response.headers.get("X-Instance-Count", "-1"))
            try:
                reader = MultipartReader(stow_boundary(response.headers.get("Content-Type", "")))
                while chunk := response.read(CHUNK):
                    for part in reader.feed(chunk):
                        datasets.append(_dataset(part.body, len(datasets)))
                reader.close()
            except (MultipartError, ValueError, OSError) as exc:
                raise SeriesIncomplete(f"the series of job {job.id} broke off: {exc}") from exc
        if len(datasets) != expected:
            # A short read would make a volume with holes: fail the attempt, try again.
            raise SeriesIncomplete(
                f"got {len(datasets)} of the series' {expected} instances for job {job.id}"
            )
        logger.info("job %d: %d instances fetched from the node", job.id, len(datasets))
        return datasets

    def store(self, job: ClaimedJob, kind: str, data: bytes) -> Output:
        query = urllib.parse.urlencode({"worker": self.worker})
        _, answer = self._call(
            "PUT",
            f"/api/worker/jobs/{job.id}/results/{kind}?{query}",
            data,
            content_type="application/dicom",
            held=True,
        )
        return Output(answer["kind"], answer["path"], answer["sop_instance_uid"])

    def encoded(
        self,
        job: ClaimedJob,
        outputs: Sequence[Output],
        timings: dict[str, float],
        findings: str,
    ) -> int:
        body = {"kinds": [o.kind for o in outputs], "timings": timings, "findings": findings}
        _, answer = self._call("POST", f"/api/worker/jobs/{job.id}/encoded", body, held=True)
        return int(answer["deliveries"])

    def skip(self, job: ClaimedJob, reason: str) -> None:
        self._call("POST", f"/api/worker/jobs/{job.id}/skip", {"reason": reason}, held=True)

    def fail(self, job: ClaimedJob, reason: str) -> str:
        _, answer = self._call(
            "POST", f"/api/worker/jobs/{job.id}/fail", {"reason": reason[:4096]}, held=True
        )
        return str(answer["state"])

    # --- HTTP ------------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | bytes,
        content_type: str = "application/json",
        held: bool = False,
    ) -> tuple[int, dict[str, Any]]:
        if isinstance(body, dict):
            data = json.dumps({"worker": self.worker, **body}).encode()
        else:
            data = body
        try:
            with self._open(method, path, data, {"Content-Type": content_type}) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            if exc.code == 409 and not held:
                return 409, {}
            raise _refusal(exc, method, path, held) from None

    def _open(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        request = urllib.request.Request(
            self.node_url.rstrip("/") + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", **(headers or {})},
        )
        try:
            return _OPENER.open(request, timeout=self.timeout_s)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError) as exc:
            raise NetworkError(f"node {self.node_url} unreachable: {exc}") from exc


class SeriesIncomplete(PacsAiError):
    """The series did not arrive whole: the attempt fails and is retried."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would follow a redirect with the bearer token, to any host: a node never
    # redirects its API, so one is an error.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _refusal(exc: urllib.error.HTTPError, method: str, path: str, held: bool) -> PacsAiError:
    """What an error answer means to the job: lost, refused, or a failed attempt."""
    detail = _detail(exc)
    if exc.code == 409 and held:
        return LeaseLost(detail)
    # 4xx: the node says no; 5xx: the node failed (a full disk, a database error). Either
    # way the node is there, so the attempt is recorded as failed and bounded by max_attempts.
    return NodeRefused(f"{method} {path.split('?')[0]}: {exc.code} {detail}")


def _detail(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("detail", ""))
    except (ValueError, AttributeError, OSError):
        return exc.reason or ""


def _dataset(data: bytes, position: int) -> Dataset:
    try:
        return pydicom.dcmread(BytesIO(data))
    except InvalidDicomError as exc:
        raise NotAVolume(f"instance {position + 1} of the series is not DICOM: {exc}") from exc


def _job(item: dict[str, Any]) -> ClaimedJob:
    return ClaimedJob(
        id=int(item["id"]),
        model=str(item["model"]),
        attempt=int(item["attempt"]),
        study_instance_uid=str(item["study_instance_uid"]),
        series_instance_uid=str(item["series_instance_uid"]),
        series_id=int(item["series_id"]),
        study_id=int(item["study_id"]),
        destinations=tuple(item["destinations"]),
        priority=Priority(item["priority"]),
    )
