"""Cloud Composer (Airflow) DAG: the nightly flex template launch, as an alternative to Cloud Scheduler.

Copy this file and the body written by `python -m launch.schedule ... --write DIR`
(nightly-PROFILE.json) into the Composer environment's dags/ folder, and set the
Airflow variables `vision_batch_project`, `vision_batch_region` and
`vision_batch_body_file` (default nightly-tpu-v6e-4.json). The body's {date}
becomes the run's logical date ({{ ds }}), so a backfilled night writes to its
own date. The Composer environment's service account needs the roles
`launch.schedule` prints for the scheduler's account.

Airflow is not a dependency of this project: tests do not import this file.
"""
from __future__ import annotations

import datetime
import json
import pathlib

from airflow import DAG
from airflow.models import Variable
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator

BODY_FILE = pathlib.Path(__file__).with_name(Variable.get("vision_batch_body_file", "nightly-tpu-v6e-4.json"))
# launch/run_dataflow.py expands the same placeholder when no scheduler templated it.
DATE_PLACEHOLDER = "{date}"

with DAG(
    dag_id="vision_batch_nightly",
    schedule="0 2 * * *",
    start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
    catchup=False,  # one launch per night from now on; backfill explicitly with `airflow dags backfill`
    max_active_runs=1,  # nights never overlap (TPU capacity is the constraint)
) as dag:
    DataflowStartFlexTemplateOperator(
        task_id="launch_flex_template",
        # `body` is a templated field: {{ ds }} becomes the logical date (YYYY-MM-DD).
        body=json.loads(BODY_FILE.read_text().replace(DATE_PLACEHOLDER, "{{ ds }}")),
        project_id=Variable.get("vision_batch_project"),
        location=Variable.get("vision_batch_region"),
        # The TPU job runs for hours; the DAG only launches it (Dataflow's UI and alerts watch it).
        wait_until_finished=False,
    )
