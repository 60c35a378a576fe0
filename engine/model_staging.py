"""Model weights from object storage: copy a checkpoint to local disk once per worker.

vLLM loads weights from a local directory. A `gs://` checkpoint is copied
under a directory named by the URI's hash, guarded by a file lock so the
SDK processes and threads of one VM copy it once, and marked complete only
after every file arrived with its listed size. A crash mid-copy leaves no
marker, so the next worker process starts over instead of loading half a
checkpoint.
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from library import environment

_LOG = logging.getLogger(__name__)
MARKER = ".vision-batch-complete.json"
COPY_THREADS = 8  # parallel object downloads: one stream tops out well below a VM's network bandwidth
CHUNK = 16 * 2**20


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def default_root() -> Path:
    return Path(environment.read(environment.MODEL_DIR) or Path(tempfile.gettempdir()) / "vision-batch-models")


def _listing(uri: str) -> dict[str, int]:
    """Relative path -> size of every object under the checkpoint URI."""
    base = uri.rstrip("/") + "/"
    result = FileSystems.match([base + "**"])[0]
    files = {meta.path[len(base):]: meta.size_in_bytes for meta in result.metadata_list if not meta.path.endswith("/")}
    if "config.json" not in files:
        raise FileNotFoundError(f"{uri} is not a Hugging Face checkpoint: no config.json among {sorted(files)[:10]}")
    return files


def _is_complete(directory: Path) -> bool:
    marker = directory / MARKER
    if not marker.is_file():
        return False
    listed = json.loads(marker.read_text())["files"]
    return all((directory / name).is_file() and (directory / name).stat().st_size == size for name, size in listed.items())


def _copy(source: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)


def stage_checkpoint(uri: str, root: Optional[Path] = None) -> str:
    """Local directory holding the checkpoint at `uri` (returned unchanged if already local)."""
    if not is_remote(uri):
        return uri
    root = root or default_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:20]
    with open(root / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copy per VM, whichever process gets here first
        if _is_complete(target):
            _LOG.info("model %s already staged at %s", uri, target)
            return str(target)
        started = time.monotonic()
        files = _listing(uri)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f"{target.name}.partial-"))
        base = uri.rstrip("/") + "/"
        try:
            with concurrent.futures.ThreadPoolExecutor(COPY_THREADS) as pool:
                list(pool.map(lambda name: _copy(base + name, staging / name), files))
            (staging / MARKER).write_text(json.dumps({"source": uri, "files": files}, sort_keys=True))
            if not _is_complete(staging):
                raise IOError(f"staging {uri} produced files whose sizes differ from the listing")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # storage gave up or the process is stopping: no half copy left on disk
            raise
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
        _LOG.info("staged model %s (%d files, %.1f MB) at %s in %.1f s", uri, len(files),
                  sum(files.values()) / 1e6, target, time.monotonic() - started)
        return str(target)
