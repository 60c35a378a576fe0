"""Installs the job's GCS retry budget (library/storage.py) in the process that imports it.

Named in `--beam_plugins` by `storage.add_worker_plugin`: Beam's worker
harness imports every plugin module at start-up, before running any bundle
(apache_beam/runners/worker/sdk_worker_main.py, `_import_beam_plugins`), in
local multi-process workers and on Dataflow alike. Nothing else imports it:
a launching process installs the budget itself when it resolves the job's
configuration (configuration/options.py).
"""
from library import storage

storage.install()
