"""Records the engine's start-up in the process that imports it (launch/canary.py `install`).

Named in `--beam_plugins` by `canary.add_worker_plugin` for preflight canaries only: Beam's worker
harness imports every plugin module at start-up, before running any bundle
(apache_beam/runners/worker/sdk_worker_main.py, `_import_beam_plugins`), so the line is recorded
whichever step starts the engine first.
"""
from launch import canary

canary.install()
