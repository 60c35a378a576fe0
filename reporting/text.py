"""Strings from outside the report (model output, file names, messages) made safe to show.

They are data: `visible` makes control characters visible instead of
letting them reach a terminal or a renderer, and `redact` masks what looks
like a credential in a URI (user:password@, signed-URL and token query
parameters) so a report can be passed around. HTML escaping is the
renderer's job (`reporting.html`).
"""
from __future__ import annotations

import re

from schemas.uris import mask_credentials

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _control_picture(match: re.Match[str]) -> str:
    code = ord(match.group())
    return "\u2421" if code == 0x7F else chr(0x2400 + code)  # Unicode "control pictures": ␀ ␛ ␡


def visible(text: str) -> str:
    """Control characters (other than tab and newlines) as their visible symbols."""
    return _CONTROL.sub(_control_picture, text)


def redact(text: str) -> str:
    """Credentials in URIs masked, as everywhere the pipeline writes text (`schemas.uris`)."""
    return mask_credentials(text)


def safe(value: object) -> str:
    """Any value as text fit to show: credentials masked, control characters visible (not yet HTML-escaped)."""
    return visible(redact(str(value)))
