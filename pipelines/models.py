"""Which checkpoint a run uses: the user's, or the project's tiny random one.

The tiny checkpoint is built offline on first use and cached on disk; after
that it is an ordinary Hugging Face directory and goes through exactly the
same loading path as a real Gemma 4 checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from configuration.options import UsageError
from engine.model_staging import is_remote

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    path: str  # local directory, or gs:// URI that workers stage to local disk
    model_id: str  # written to rows; part of incremental-run keys
    is_random: bool  # the tiny random-weight checkpoint


def resolve_model(model: Optional[str], model_id: Optional[str], tiny_preset: str) -> ModelChoice:
    if model is None:
        from tiny_model.checkpoint import ensure_checkpoint

        path = ensure_checkpoint(tiny_preset)
        return ModelChoice(path=str(path), model_id=model_id or f"tiny-random-gemma4/{path.name}", is_random=True)
    if is_remote(model):
        # Workers copy it to local disk once each (engine/model_staging.py); check it now,
        # so a wrong path fails at launch rather than on every worker.
        if not FileSystems.exists(model.rstrip("/") + "/config.json"):
            raise UsageError(f"--model {model}: no config.json there: not a Hugging Face checkpoint")
        return ModelChoice(path=model.rstrip("/"), model_id=model_id or model.rstrip("/"), is_random=False)
    if not os.path.isdir(model) or not os.path.isfile(os.path.join(model, "config.json")):
        raise UsageError(f"--model {model}: not a Hugging Face checkpoint directory (no config.json)")
    return ModelChoice(path=os.path.abspath(model), model_id=model_id or model.rstrip("/"), is_random=False)
