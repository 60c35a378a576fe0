"""Object storage under faults: one retry budget for every GCS request, and outages told apart from bad inputs.

What retries without this module (Beam 2.77 on google-cloud-storage 3.17):
every request Beam's GCS filesystem makes (list, stat, ranged reads,
resumable-upload chunks, single and batch copies and deletes) is retried on
429, 408, 5xx, resets and timeouts with google-cloud-storage's
`DEFAULT_RETRY`: exponential back-off from 1 s, doubling to at most 60 s,
for up to 120 s per request (`gcsio_retry.get_retry`), with no way to change
it from the command line. Two gaps:

- the metadata read that opens every file (`BeamBlobReader` calls
  `blob.reload()`) always uses the library default, whatever Beam's policy;
- Beam's batch copy and delete (its rename, used to finalise the output
  files) swallow the give-up: a batch that never got an answer fails later
  with `'NoneType' object has no attribute 'status_code'`, and per-object
  failures only as status codes.

`install()` makes Beam build its GCS retry from the job's own pipeline
options (`--gcs_retry_*`, read from the options each filesystem call is made
with, so every worker process uses its job's budget), gives the reader's
metadata read the same policy, and turns a request still failing when the
budget is spent into one `StorageFailure` naming the operation and the
object(s). Importing this module changes nothing. The launching process
installs it when it resolves the job's configuration, before its first read
(configuration/options.py); every worker process by importing `PLUGIN`,
which the launcher adds to `--beam_plugins`: Beam's worker harness imports
those at start-up before running any bundle (local multi-process workers
and Dataflow workers alike).

A `StorageFailure` is not an input's fault: stages re-raise it
(`raise_if_outage`) instead of writing an error row, so the bundle fails
(and is retried by the runner) and, if storage stays down, the run fails
with that message. A missing or forbidden object (404/403) is still the
input's own error row.

Lost answers: a retried request whose first attempt took effect is safe for
every operation Beam issues: reads and stats are idempotent; a resumable
upload chunk resent to a finished session is answered with the object
(GCS keeps the session); a repeated copy writes the same bytes again; a
repeated delete gets 404, which Beam counts as deleted.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import urllib.parse
import urllib.request
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.gcp import gcsio, gcsio_retry
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, SetupOptions
from google.api_core.retry import (
    Retry,
    RetryFailureReason,
    build_retry_error,
    exponential_sleep_generator,
    retry_target,
)
from google.cloud.storage.retry import _should_retry

PLUGIN = "library.gcs_retry_plugin"  # for --beam_plugins: workers import it before running any bundle


@dataclasses.dataclass(frozen=True)
class RetryBudget:
    """How long one storage request may keep retrying, and how it backs off.

    Defaults are google-cloud-storage's own `DEFAULT_RETRY` (google-api-core
    `retry_base`: initial 1.0 s, maximum 60 s, multiplier 2, deadline 120 s), so
    a job without the options behaves as the client library would.
    """

    timeout_s: float = 120.0  # per request, all attempts and waits included
    initial_delay_s: float = 1.0  # first wait; each wait is drawn uniformly below the current bound (full jitter)
    max_delay_s: float = 60.0  # bound on any one wait
    multiplier: float = 2.0  # the bound doubles after each failed attempt

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.initial_delay_s <= 0 or self.max_delay_s < self.initial_delay_s:
            raise ValueError(
                f"GCS retry budget needs --gcs_retry_timeout_s > 0 and 0 < --gcs_retry_initial_delay_s <= "
                f"--gcs_retry_max_delay_s; got {self.timeout_s}, {self.initial_delay_s}, {self.max_delay_s}"
            )

    @staticmethod
    def from_options(options: Union[PipelineOptions, Mapping[str, Any], None]) -> "RetryBudget":
        """The job's `--gcs_retry_*` values (declared by `add_retry_arguments`), defaults where not given.

        Read from the options' flags themselves, not through the pipeline's
        options class: that class sits above this module (configuration/), and
        a worker may reach GCS before anything has imported it. Beam's
        `get_all_options(current_only=True, retain_unknown_options=True)`
        needs no class's declarations: it keeps undeclared flags' values as
        strings (hence `float`), with values set on any view applied.
        """
        if options is None:
            return RetryBudget()
        if not isinstance(options, PipelineOptions):
            options = PipelineOptions.from_dictionary(dict(options))
        given = options.get_all_options(current_only=True, retain_unknown_options=True)
        default = RetryBudget()
        return RetryBudget(
            float(given.get("gcs_retry_timeout_s", default.timeout_s)),
            float(given.get("gcs_retry_initial_delay_s", default.initial_delay_s)),
            float(given.get("gcs_retry_max_delay_s", default.max_delay_s)),
        )

    def retry(self, on_error: Optional[Callable[[Exception], None]] = None) -> "BudgetedRetry":
        return BudgetedRetry(
            predicate=_should_retry,  # google-cloud-storage's: 408, 429, 5xx, resets, timeouts
            initial=self.initial_delay_s,
            maximum=self.max_delay_s,
            multiplier=self.multiplier,
            timeout=self.timeout_s,
            on_error=on_error,
        )


class StorageFailure(Exception):
    """A storage request still failing when its retry budget ran out.

    Deliberately not an OSError: readers that turn OSError into "truncated
    input" (tar streaming) must not mistake an outage for a broken file.
    """

    def __init__(self, operation: str, objects: Sequence[str], timeout_s: float, attempts: int, cause: str):
        self.operation = operation
        self.objects = tuple(objects)
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.cause = cause  # the last error, one line
        super().__init__(self.describe())

    def describe(self) -> str:
        named = list(self.objects)
        if self.operation == "copy" and len(named) % 2 == 0:  # (source, destination) pairs
            named = [f"{source} -> {destination}" for source, destination in zip(named[::2], named[1::2])]
        target = ", ".join(named[:4]) + (f" and {len(named) - 4} more" if len(named) > 4 else "")
        return (
            f"storage {self.operation} of {target or 'an object'} still failing after {self.attempts} attempts "
            f"in {self.timeout_s:g} s (--gcs_retry_timeout_s): {self.cause}"
        )

    def naming(self, uri: str) -> "StorageFailure":
        """The same failure, naming `uri` when the request itself did not say (a resumable-upload chunk)."""
        return self if self.objects else StorageFailure(self.operation, (uri,), self.timeout_s, self.attempts, self.cause)


class BudgetedRetry(Retry):
    """google-api-core's Retry, giving up with a StorageFailure that names what failed."""

    def __call__(self, func: Callable[..., Any], on_error: Optional[Callable[[Exception], Any]] = None) -> Callable[..., Any]:
        on_error = self._on_error or on_error

        @functools.wraps(func)
        def retry_wrapped(*args: Any, **kwargs: Any) -> Any:
            return retry_target(
                functools.partial(func, *args, **kwargs),
                self._predicate,
                exponential_sleep_generator(self._initial, self._maximum, multiplier=self._multiplier),
                timeout=self._timeout,
                on_error=on_error,
                exception_factory=self._give_up,
            )

        return retry_wrapped

    def _give_up(self, errors: list[Exception], reason: RetryFailureReason, timeout: Optional[float]) -> tuple[Exception, Optional[Exception]]:
        if reason != RetryFailureReason.TIMEOUT or not errors:
            return build_retry_error(errors, reason, timeout)  # a non-retryable answer (404, 403, ...) passes as it is
        last = errors[-1]
        operation, objects = describe_request(*_request_of(last))
        return StorageFailure(operation, objects, self._timeout or 0.0, len(errors), one_line(last)), last


# -- naming the request that failed ----------------------------------------------

_OBJECT_PATH = re.compile(
    r"/b/(?P<bucket>[^/?\s]+)/o/(?P<name>[^?\s]+?)"
    r"(?:/(?:copyTo|rewriteTo)/b/(?P<dest_bucket>[^/?\s]+)/o/(?P<dest>[^?\s]+))?(?:[?\s]|$)"
)
_BUCKET_LIST = re.compile(r"/b/(?P<bucket>[^/?\s]+)/o(?:[?\s]|$)")
_BATCH_LINE = re.compile(r"^(?P<method>GET|POST|PUT|PATCH|DELETE) (?P<url>\S+)", re.MULTILINE)


def _uri(bucket: str, name: str) -> str:
    return f"gs://{bucket}/{urllib.parse.unquote(name)}"


def describe_request(method: str, url: str, body: Union[bytes, str, None] = None) -> tuple[str, tuple[str, ...]]:
    """(operation, gs:// objects) of a GCS JSON-API request.

    Operations: list, stat, read, write, copy (objects in source, destination
    pairs), delete, update, batch (a batch of mixed operations), bucket, request.

    Batch requests (Beam's rename: a batch of copies, then a batch of deletes)
    are described by their parts. Uploads name no object in their URL.
    """
    parts = urllib.parse.urlsplit(url or "")
    query = urllib.parse.parse_qs(parts.query)
    if parts.path.startswith("/batch/"):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body or ""
        operations, objects = set(), []
        for line in _BATCH_LINE.finditer(text):
            operation, named = describe_request(line["method"], line["url"])
            if named:
                operations.add(operation)
                objects.extend(named)
        return (operations.pop() if len(operations) == 1 else "batch"), tuple(objects)
    if parts.path.startswith("/upload/"):
        return "write", ()  # the object is named in the body or only by the session: `_NamingBlobWriter` names it
    match = _OBJECT_PATH.search(parts.path)
    if match:
        objects = (_uri(match["bucket"], match["name"]),)
        if match["dest"]:
            return "copy", objects + (_uri(match["dest_bucket"], match["dest"]),)
        if method == "DELETE":
            return "delete", objects
        if method == "GET":
            media = parts.path.startswith("/download/") or query.get("alt", [""])[0] == "media"
            return ("read" if media else "stat"), objects
        return "update", objects
    match = _BUCKET_LIST.search(parts.path)
    if match and method == "GET":
        return "list", (f"gs://{match['bucket']}/{query.get('prefix', [''])[0]}",)
    return ("bucket" if "/b/" in parts.path else "request"), ()


def _request_of(error: BaseException) -> tuple[str, str, Any]:
    """Method, URL and body of the HTTP request behind a client-library error, where it says."""
    request = getattr(error, "request", None)  # requests' own errors
    if request is None and getattr(error, "response", None) is not None:
        request = getattr(error.response, "request", None)  # api_core's GoogleAPICallError, InvalidResponse
    if request is None:
        for inner in error.args:
            if isinstance(inner, BaseException) and inner is not error:
                return _request_of(inner)  # google-auth wraps transport errors
        return "", "", None
    return request.method or "", request.url or "", getattr(request, "body", None)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:300]}"


# -- finding outages among other errors ----------------------------------------


def _chain(error: BaseException, seen: Optional[set[int]] = None) -> Iterator[BaseException]:
    """The error, its causes and contexts, and what Beam's BeamIOError wraps per path."""
    seen = seen if seen is not None else set()
    if id(error) in seen:
        return
    seen.add(id(error))
    yield error
    if isinstance(error, BeamIOError) and isinstance(error.exception_details, dict):
        for inner in error.exception_details.values():
            if isinstance(inner, BaseException):
                yield from _chain(inner, seen)
    for inner in (error.__cause__, error.__context__):
        if inner is not None:
            yield from _chain(inner, seen)


def find_outage(error: BaseException) -> Optional[StorageFailure]:
    return next((e for e in _chain(error) if isinstance(e, StorageFailure)), None)


def raise_if_outage(error: BaseException) -> None:
    """Re-raise a storage outage hidden in `error`; other errors are the caller's to record.

    Stages call it first in their catch-all handlers: an input that cannot be
    read because storage is down is not a bad input, and must not end as an
    error row (the next run would count it as answered-with-error).
    """
    failure = find_outage(error)
    if failure is not None:
        raise failure from error


_FAILURE_IN_TEXT = re.compile(r"StorageFailure: (storage .*?)(?: \[while running '[^']*'\])?$", re.MULTILINE)


def failure_line(error: BaseException) -> Optional[str]:
    """The storage failure behind a failed run, as one line: from the error itself or a worker's traceback text."""
    failure = find_outage(error)
    if failure is not None:
        return failure.describe()
    for inner in _chain(error):
        match = _FAILURE_IN_TEXT.search(str(inner))
        if match:
            return match.group(1).strip()
    return None


# -- wiring into Beam's GCS client ---------------------------------------------


def beam_retry(pipeline_options: Union[PipelineOptions, Mapping[str, Any], None]) -> BudgetedRetry:
    """Replacement for Beam's `gcsio_retry.get_retry`: the job's budget, Beam's throttling counter kept."""
    budget = RetryBudget.from_options(pipeline_options)
    options = pipeline_options if isinstance(pipeline_options, PipelineOptions) else PipelineOptions.from_dictionary(dict(pipeline_options or {}))
    counting = not options.view_as(GoogleCloudOptions).no_gcsio_throttling_counter
    return budget.retry(on_error=gcsio_retry.ThrottlingHandler() if counting else None)


class _BudgetedBlobReader(gcsio.BeamBlobReader):
    """Beam's reader, whose opening metadata read follows the job's retry policy too."""

    def __init__(self, blob: Any, *args: Any, **kwargs: Any):
        if kwargs.get("retry") is not None:  # GcsIO.open passes the job's policy by keyword
            blob.reload = functools.partial(blob.reload, retry=kwargs["retry"])
        try:
            super().__init__(blob, *args, **kwargs)
        except StorageFailure as failure:
            raise failure.naming(f"gs://{blob.bucket.name}/{blob.name}") from failure


class _NamingBlobWriter(gcsio.BeamBlobWriter):
    """Beam's writer, naming its object when an upload chunk (addressed by session id only) gives up."""

    def _uri(self) -> str:
        return f"gs://{self._blob.bucket.name}/{self._blob.name}"

    def write(self, b: Any) -> int:
        try:
            return super().write(b)
        except StorageFailure as failure:
            raise failure.naming(self._uri()) from failure

    def close(self) -> None:
        try:
            super().close()
        except StorageFailure as failure:
            self._buffer.close()  # closed for good: io's __del__ would otherwise retry the whole upload once more
            raise failure.naming(self._uri()) from failure


def add_retry_arguments(group: Any) -> None:
    """Declare `--gcs_retry_*` (the pipeline's options class calls it). Defaults: the client library's (`RetryBudget`)."""
    default = RetryBudget()
    group.add_argument(
        "--gcs_retry_timeout_s", type=float, default=default.timeout_s,
        help="Seconds one GCS request may keep retrying 429/5xx/resets/timeouts before the run fails naming the "
             "object and operation.",
    )
    group.add_argument(
        "--gcs_retry_initial_delay_s", type=float, default=default.initial_delay_s,
        help="Bound on the first wait between attempts; the bound doubles per attempt (waits are random below it).",
    )
    group.add_argument(
        "--gcs_retry_max_delay_s", type=float, default=default.max_delay_s,
        help="Bound on any one wait between attempts.",
    )


def add_worker_plugin(options: PipelineOptions) -> None:
    """Have every worker process install the job's budget (import `PLUGIN`) before any bundle."""
    setup = options.view_as(SetupOptions)
    setup.beam_plugins = sorted({*(setup.beam_plugins or ()), PLUGIN})


def install() -> None:
    """Point Beam's GCS client at the job's retry budget (idempotent)."""
    gcsio_retry.get_retry = beam_retry
    gcsio.BeamBlobReader = _BudgetedBlobReader
    gcsio.BeamBlobWriter = _NamingBlobWriter


# -- proving a location usable before paying for the work behind it ------------

# Where a Compute Engine VM (a Dataflow worker) names its service account; GCE_METADATA_HOST overrides it as in
# google-auth (google/auth/compute_engine/_metadata.py). The IP avoids a DNS lookup off Google Cloud.
_METADATA_ACCOUNT = "/computeMetadata/v1/instance/service-accounts/default/email"

ROUND_TRIP_STEPS = ("write", "read_back", "delete")


def service_account(timeout_s: float = 2.0) -> Optional[str]:
    """The VM's service account from the metadata server (on Dataflow: the job's worker account); None off Google Cloud."""
    host = os.environ.get("GCE_METADATA_HOST", "169.254.169.254")
    request = urllib.request.Request(f"http://{host}{_METADATA_ACCOUNT}", headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return answer.read().decode().strip()
    except Exception:  # noqa: BLE001 - no metadata server: not on a Google Cloud VM
        return None


def service_message(error: BaseException) -> Optional[str]:
    """GCS's own words for a refused request (its JSON error body: for a 403, which account lacks which permission),
    where the client's exception does not repeat them: google-resumable-media's InvalidResponse, which Beam's
    uploads raise, says only the status code."""
    response = getattr(error, "response", None)
    try:
        message = response.json()["error"]["message"]  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - no response, or a body that is not GCS's error shape
        return None
    return message if isinstance(message, str) and message not in str(error) else None


def round_trip(uri: str, payload: bytes) -> tuple[tuple[str, ...], Optional[Exception]]:
    """Write `payload` to `uri`, read it back and delete it through Beam's filesystems: the client, credentials and
    retry budget every other object of the job uses. Returns the steps of `ROUND_TRIP_STEPS` that succeeded, in
    order, and the error that stopped the next one (None when all three did)."""
    done: list[str] = []
    try:
        with FileSystems.create(uri, mime_type="application/octet-stream",
                                compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(payload)
        done.append("write")
        with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            read = handle.read()
        if read != payload:
            raise IOError(f"read back {len(read)} bytes that differ from the {len(payload)} written")
        done.append("read_back")
        FileSystems.delete([uri])
        done.append("delete")
    except Exception as exc:  # noqa: BLE001 - the finding is which step failed, and why
        return tuple(done), exc
    return tuple(done), None
