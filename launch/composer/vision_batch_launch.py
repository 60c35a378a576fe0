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

import json
import pathlib
from typing import Any

# launch/run_dataflow.py expands the same placeholder when nothing templated it.
DATE_PLACEHOLDER = "{date}"
# The run's logical date (YYYY-MM-DD): a backfilled night writes to its own date.
LOGICAL_DATE = "{{ ds }}"
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
        "body": json.loads(body_text.replace(DATE_PLACEHOLDER, LOGICAL_DATE)),
        "project_id": PROJECT_TEMPLATE,
        "location": REGION_TEMPLATE,
        # The body's job name is fixed per profile: Dataflow refuses a second job of that name while one
        # runs, so a slow night blocks the next launch instead of overlapping it. The operator's default
        # (append_job_name=True) would add a random suffix and defeat that.
        "append_job_name": False,
        # The job runs for hours; the DAG only launches it (Dataflow's UI and alerts watch it).
        "wait_until_finished": False,
    }
