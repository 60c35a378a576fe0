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

Not patched: a resent chunk of an unfinished upload (GCS ignores the bytes it
already has; the emulator answers 400). The pipeline's uploads are single
chunks (Beam writes in 16 MiB chunks and test files are far smaller), so
only the finished-session case occurs.
"""
from __future__ import annotations

import sys
import threading

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


objects._finalize_resumable_object = _finalize_and_remember
objects.upload_partial = _upload_partial_after_finish

# The server module builds its routing table from `objects` at import: import it only now.
from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
