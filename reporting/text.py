"""Strings from outside the report (model output, file names, messages) made safe to show.

They are data: `visible` makes control characters visible instead of
letting them reach a terminal or a renderer, and `redact` masks what looks
like a credential in a URI (user:password@, signed-URL and token query
parameters) so a report can be passed around. HTML escaping is the
renderer's job (`reporting.html`).
"""
from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
_SECRET_PARAMS = re.compile(
    r"([?&](?:access_token|token|key|api_key|apikey|sig|signature|password|secret|credential|"
    r"x-goog-signature|x-goog-credential|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&#\s]+",
    re.IGNORECASE,
)


def _control_picture(match: re.Match[str]) -> str:
    code = ord(match.group())
    return "\u2421" if code == 0x7F else chr(0x2400 + code)  # Unicode "control pictures": ␀ ␛ ␡


def visible(text: str) -> str:
    """Control characters (other than tab and newlines) as their visible symbols."""
    return _CONTROL.sub(_control_picture, text)


def redact(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://***@host`; `?token=...` / `&X-Goog-Signature=...` -> `=***`."""
    return _SECRET_PARAMS.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def safe(value: object) -> str:
    """Any value as text fit to show: credentials masked, control characters visible (not yet HTML-escaped)."""
    return visible(redact(str(value)))
