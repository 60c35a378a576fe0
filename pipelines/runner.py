"""Runner selection: a deterministic local runner, anything else left to Beam.

Beam 2.77's DirectRunner first tries the Prism runner, which downloads a Go
binary: offline it fails and silently falls back, online it runs a different
engine. Local runs here always use the FnApiRunner directly, so the same code
path runs with or without a network (tests, laptops, CI).
"""
from __future__ import annotations

from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineRunner

LOCAL_RUNNER_NAMES = {None, "", "direct", "directrunner", "fnapirunner"}


def is_local(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner
    return (runner or "").lower() in LOCAL_RUNNER_NAMES


def make_runner(options: PipelineOptions) -> Optional[PipelineRunner]:
    """The FnApiRunner for local runs (honouring direct_running_mode/direct_num_workers); None otherwise."""
    if not is_local(options):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    provision = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=provision)
