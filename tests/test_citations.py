"""Facts are cited to their upstream source (a repository and path, or a documentation page), never to private notes.

A reader of the repository can follow a citation only to something public. Working notes kept
outside the repository were cited in comments once; this fails if any tracked file names them again.
"""
from __future__ import annotations

import pathlib
import re
import subprocess

REPO = pathlib.Path(__file__).resolve().parent.parent
# Spelt in pieces so that this file does not match itself.
PRIVATE_NOTES = re.compile("field" + r"[-_ ]?" + "notes|" + r"\.\./" + "shared/", re.IGNORECASE)


def tracked_files() -> list[pathlib.Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    return [REPO / name for name in listed.decode().split("\0") if name]


def test_no_tracked_file_cites_private_notes():
    citing = []
    for path in tracked_files():
        if not path.is_file():  # deleted in the work tree, not yet in the index
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        citing += [
            f"{path.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)}"
            for match in PRIVATE_NOTES.finditer(text)
        ]
    assert not citing, "cite the upstream source instead:\n" + "\n".join(citing)
