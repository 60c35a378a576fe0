"""What the Composer DAG passes to DataflowStartFlexTemplateOperator, without Airflow.

Copied into the Composer environment's dags/ folder beside
vision_batch_nightly.py (the DAG), which imports it by module name; tests
import it as launch.composer.vision_batch_launch. Standard library only:
Composer's workers have no copy of this project.

The arguments follow apache-airflow-providers-google's
DataflowStartFlexTemplateOperator: `body`, `location` and `project_id` are
templated fields, rendered when the task runs (no Airflow Variable is read
while the DAG file is parsed, which the scheduler does every few seconds).
"""
from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any

# launch/run_dataflow.py expands the same placeholder when nothing templated it.
DATE_PLACEHOLDER = "{date}"
# The night's date (YYYY-MM-DD): the UTC date of the moment the run is scheduled to fire, the date Cloud
# Scheduler's launches get ({date} expanded by launch/run_dataflow.py on the launcher, in UTC), so both paths
# write a night to the same OUTPUT_ROOT/DATE. Not `{{ ds }}`: that is the logical date, which under Airflow 2's
# cron timetable is the START of the data interval, the day BEFORE the run fires (a 02:00 run on 03-05 has
# ds 03-04), while Airflow 3's default cron timetable (CronTriggerTimetable, [scheduler]
# create_cron_data_intervals = False) makes it the firing time. `data_interval_end` is the firing time under
# both (Airflow docs, "Templates reference": data_interval_end; "Timetables": CronTriggerTimetable has an
# empty data interval at the trigger time), and a rerun or backfill of a night keeps that night's date.
# `ds` is Airflow's date filter (apache/airflow airflow/templates.py ds_filter: strftime("%Y-%m-%d")).
NIGHT_DATE = "{{ data_interval_end | ds }}"
# A night still unfinished after this fails its task (red): TemplateJobStartTrigger only ends on DONE, FAILED
# or STOPPED (apache/airflow providers/google/.../triggers/dataflow.py), so a job cancelled from the console
# would otherwise keep the task waiting. A deferred task's trigger times out with the task's execution_timeout
# (Airflow docs, "Deferrable Operators & Triggers"). Below the 24 h between nights: max_active_runs=1 makes the
# next night wait for this one.
NIGHT_TIMEOUT = datetime.timedelta(hours=20)
# Airflow Variables, rendered at run time (Admin > Variables, or `airflow variables set`).
PROJECT_TEMPLATE = "{{ var.value.vision_batch_project }}"
REGION_TEMPLATE = "{{ var.value.vision_batch_region }}"
# Bodies written by `python -m launch.schedule ... --write DIR`, one per launch profile.
BODY_GLOB = "nightly-*.json"


def body_files(dags_folder: pathlib.Path) -> list[pathlib.Path]:
    """The nightly launch bodies copied beside the DAG: one launch task each."""
    return sorted(dags_folder.glob(BODY_GLOB))


def task_id(body_file: pathlib.Path) -> str:
    """`launch_tpu_v6e_1` for nightly-tpu-v6e-1.json (Airflow task ids: letters, digits, _, -, .)."""
    return "launch_" + body_file.stem[len("nightly-"):].replace("-", "_")


def launch_arguments(body_text: str) -> dict[str, Any]:
    """Keyword arguments of DataflowStartFlexTemplateOperator for one flexTemplates:launch body."""
    return {
        "body": json.loads(body_text.replace(DATE_PLACEHOLDER, NIGHT_DATE)),
        "project_id": PROJECT_TEMPLATE,
        "location": REGION_TEMPLATE,
        # The body's job name is fixed per profile: Dataflow refuses a second job of that name while one
        # runs, so a slow night blocks the next launch instead of overlapping it. The operator's default
        # (append_job_name=True) would add a random suffix and defeat that.
        "append_job_name": False,
        # The task follows the job to its end and fails (red) when the launch is refused (the launch call
        # raises), the launcher refuses the night (e.g. a rerun into a finished night's output: the job ends
        # JOB_STATE_FAILED in the launcher) or the job fails or is stopped. Deferred: the wait runs in Airflow's
        # triggerer, not on a worker slot, for the hours the job runs (apache/airflow
        # providers/google/src/airflow/providers/google/cloud/operators/dataflow.py:
        # DataflowStartFlexTemplateOperator.execute -> hook.launch_job_with_flex_template, which posts `body` as the
        # flexTemplates:launch request, then defers to TemplateJobStartTrigger; execute_complete raises
        # AirflowException on an "error" or "stopped" event). `wait_until_finished` stays unset: the operator
        # refuses it True beside deferrable=True and sets it False itself (_validate_deferrable_params), and
        # `expected_terminal_state` is not read on the deferred path (the trigger succeeds on JOB_STATE_DONE only).
        "deferrable": True,
        "execution_timeout": NIGHT_TIMEOUT,
    }
