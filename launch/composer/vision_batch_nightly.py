"""Cloud Composer (Airflow) DAG: the nightly flex template launch, as an alternative to Cloud Scheduler.

Copy this file, vision_batch_launch.py and the bodies written by
`python -m launch.schedule ... --write DIR` (nightly-PROFILE.json) into the
Composer environment's dags/ folder, and set the Airflow variables
`vision_batch_project` and `vision_batch_region`. Each body becomes one
launch task; its {date} becomes the night's UTC date (the firing time's,
as on the Cloud Scheduler path), and the task stays running until the
Dataflow job ends: a refused launch or a failed job turns it red. The
Composer environment's service account needs the roles `launch.schedule`
prints for the scheduler's account.

Airflow is not a dependency of this project: tests check
vision_batch_launch.py (the operator's arguments) and this file's source.
"""
from __future__ import annotations

import datetime
import pathlib

from airflow import DAG
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator
from vision_batch_launch import body_files, launch_arguments, task_id  # beside this file in dags/

with DAG(
    dag_id="vision_batch_nightly",
    schedule="0 2 * * *",
    start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
    catchup=False,  # one launch per night from now on; backfill explicitly with `airflow dags backfill`
    max_active_runs=1,  # nights never overlap (accelerator capacity is the constraint)
) as dag:
    for body_file in body_files(pathlib.Path(__file__).parent):
        DataflowStartFlexTemplateOperator(task_id=task_id(body_file), **launch_arguments(body_file.read_text()))
