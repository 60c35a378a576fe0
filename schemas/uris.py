"""Canonical URIs and credential masking: the one place that decides how a location is written down.

Item ids are join keys across runs, so the same file must get the same id
whatever the working directory, the manifest's spelling or the credentials
used to reach it:

- local paths become absolute and normalised (`~` expanded, `.`/`..` and
  doubled slashes resolved lexically). Symlinks are *not* resolved: the id
  names the path the user gave (a `current -> 2026-05` link keeps its
  logical name, and the report re-reads the file through that same path).
  The same file reached through two different links therefore has two ids,
  but one `content_hash`, so incremental runs still skip it.
- URIs (`scheme://...`) keep their path as is (object stores treat `a//b`
  and `..` as literal names) and lose their credentials: the user-info part
  (`user:password@`) is dropped, secret query parameters are masked.

`mask_credentials` applies the same masking to any text (messages, log
lines, option values), so a secret given inside a URI is never written out.
"""
from __future__ import annotations

import os
import posixpath
import re

_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# User-info runs to the last '@' before the path: a password holding '@' is masked whole. The same
# forms percent-encoded (`gs%3A%2F%2Falice%3Ahunter2%40b`) appear in request URLs that client
# libraries put in their errors, as does a bucket named with the user-info Beam kept in it
# (GCS JSON API `/b/alice:hunter2@b/o/...`: a bucket name never holds '@').
_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*(?:://|%3A%2F%2F))(?:(?!%2F)[^/\s?#])+(?:@|%40)", re.IGNORECASE)
_BUCKET_USERINFO = re.compile(r"(/b/)[^/\s?#]*(?:@|%40)", re.IGNORECASE)
_SECRET_NAMES = (
    r"(?:access_token|token|key|api_key|apikey|sig|signature|password|secret|credential|"
    r"x-goog-signature|x-goog-credential|x-amz-signature|x-amz-credential|x-amz-security-token)"
)
_SECRET_PARAMS = re.compile(rf"([?&]{_SECRET_NAMES}=)[^&#\s'\"<>]+", re.IGNORECASE)
# Encoded (`t.yaml%3Ftoken%3DTOK123`, an object name in a request URL): `%26` ends the value there.
_ENCODED_SECRET_PARAMS = re.compile(rf"((?:%3F|%26){_SECRET_NAMES}%3D)(?:(?!%26)[^&#?\s'\"<>])+", re.IGNORECASE)
MASK = "***"


def is_uri(location: str) -> bool:
    """`gs://b/x` and other `scheme://` locations, as opposed to local paths."""
    return bool(_SCHEME.match(location))


def mask_credentials(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://***@host`; `?token=...` / `&X-Goog-Signature=...` -> `=***`.

    Percent-encoded forms too, and the user-info Beam keeps in a bucket name of a GCS request URL.
    """
    text = _BUCKET_USERINFO.sub(rf"\1{MASK}@", _USERINFO.sub(rf"\1{MASK}@", text))
    return _ENCODED_SECRET_PARAMS.sub(rf"\1{MASK}", _SECRET_PARAMS.sub(rf"\1{MASK}", text))


def without_credentials(text: str) -> str:
    """URIs in `text` as a job may be given them: user-info dropped, secret query parameters masked.

    What `canonical_uri` does to a URI; `launch.submit` applies it to the options it sends to Dataflow
    (and prints), so a password pasted into a URI never leaves the machine.
    """
    return _SECRET_PARAMS.sub(rf"\1{MASK}", _USERINFO.sub(r"\1", text))


def canonical_uri(location: str) -> str:
    """The canonical spelling of a file location (see the module docstring). Globs pass through unchanged."""
    if is_uri(location):
        return without_credentials(location)
    return os.path.abspath(os.path.expanduser(location))


def canonical_item_id(item_id: str) -> str:
    """An item id written by hand (`scans/a.tiff#page=1`) in the spelling `ItemRef.make` gives it."""
    location, sep, suffix = item_id.partition("#")
    return canonical_uri(location) + sep + suffix


def resolve_relative(entry: str, base_dir: str) -> str:
    """A manifest entry relative to the manifest's folder, as a URL reference resolves (RFC 3986 5.2).

    Absolute entries (local or URI) are taken as they are; `..` in a relative
    entry climbs from the manifest's folder, for object stores too.
    """
    if is_uri(entry) or os.path.isabs(entry) or entry.startswith("~"):
        return canonical_uri(entry)
    if is_uri(base_dir):
        scheme, rest = base_dir.split("://", 1)
        bucket, _, path = rest.partition("/")
        joined = posixpath.normpath(posixpath.join("/", path, entry)).lstrip("/")
        return canonical_uri(f"{scheme}://{bucket}/{joined}")
    return canonical_uri(os.path.join(base_dir, entry))
