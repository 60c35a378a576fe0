"""gcp-storage-emulator, with one fix that makes lost upload answers behave as on GCS.

Run as `python tests/gcs_emulator_server.py start --host H --port P --in-memory -q`
(the emulator's own command line).

GCS keeps a finished resumable-upload session: a chunk sent again to it is
answered 200 with the object's metadata ("Resuming an already finalized
object will result with a response containing the uploaded object's
metadata": googleapis/storage-testbench, testbench/rest_server.py
`resumable_upload_chunk` and gcs/upload.py, Google's own conformance
server; GCS docs "Resumable uploads", section "resent data"). That is what
lets google-cloud-storage retry the last chunk of an upload whose answer
was lost. gcp-storage-emulator (2026.7.19) forgets the session when it
finishes and answers such a retry 404, so a lost answer would fail uploads
here that succeed on GCS. This keeps each finished session's object
resource and answers a repeated chunk with it.

Second fix: generation preconditions. GCS refuses a write or delete whose
`ifGenerationMatch` is not the object's current generation with 412
conditionNotMet, and `ifGenerationMatch=0` means "succeed only if there are
no live versions of the object" (GCS JSON API reference, objects.insert and
objects.delete, "ifGenerationMatch"; docs "Request preconditions"). The
emulator ignores the parameter (it has no code for it), so every
conditional write succeeded here; the output lock (pipelines/output_lock.py)
depends on it. This checks it on uploads (checked when the upload starts:
GCS checks again when it finishes, which only a race inside one resumable
upload could tell apart) and deletes.

Not patched: a resent chunk of an unfinished upload (GCS ignores the bytes it
already has; the emulator answers 400). The pipeline's uploads are single
chunks (Beam writes in 16 MiB chunks and test files are far smaller), so
only the finished-session case occurs.
"""
from __future__ import annotations

import sys
import threading
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_finished: dict[str, dict] = {}  # upload id -> object resource of the finished upload
_lock = threading.Lock()
_finalize = objects._finalize_resumable_object
_upload_partial = objects.upload_partial


def _finalize_and_remember(response, storage, obj, data, upload_id):  # noqa: ANN001 - the emulator's signature
    _finalize(response, storage, obj, data, upload_id)
    with _lock:
        _finished[upload_id] = dict(obj)


def _upload_partial_after_finish(request, response, storage, *args, **kwargs):  # noqa: ANN001
    upload_id = request.query.get("upload_id", [""])[0]
    with _lock:
        finished = _finished.get(upload_id)
    if finished is not None:
        response.json(finished)
        return
    _upload_partial(request, response, storage, *args, **kwargs)


_CONDITION_NOT_MET = {
    "error": {
        "code": 412,
        "message": "At least one of the pre-conditions you specified did not hold.",
        "errors": [{"domain": "global", "reason": "conditionNotMet", "message": "At least one of the pre-conditions you specified did not hold."}],
    }
}


def _precondition_holds(request, storage, bucket_name, object_id) -> bool:  # noqa: ANN001
    wanted = request.query.get("ifGenerationMatch", [None])[0]
    if wanted is None:
        return True
    try:
        current = storage.get_file_obj(bucket_name, object_id)["generation"]
    except NotFound:
        current = "0"
    return str(wanted) == str(current)


def _conditional(handler, object_name):  # noqa: ANN001
    def checked(request, response, storage, *args, **kwargs):  # noqa: ANN001
        bucket_name = request.params["bucket_name"]
        if not _precondition_holds(request, storage, bucket_name, object_name(request)):
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json(_CONDITION_NOT_MET)
            return None
        return handler(request, response, storage, *args, **kwargs)

    return checked


def _uploaded_name(request) -> str:  # noqa: ANN001
    if "name" in request.query:
        return request.query["name"][0]
    meta = request.data.get("meta", request.data) if isinstance(request.data, dict) else {}
    return meta.get("name", "")


objects._finalize_resumable_object = _finalize_and_remember
objects.upload_partial = _upload_partial_after_finish
objects.insert = _conditional(objects.insert, _uploaded_name)
objects.delete = _conditional(objects.delete, lambda request: request.params["object_id"])

# The server module builds its routing table from `objects` at import: import it only now.
from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
