"""Run one DAG with dag.test() and write its outcome as JSON: ``run_dag.py DAG_ID CONF_JSON OUTPUT_JSON``.

Run by run_demo.py in a child process, so Airflow's verbose logs go to the demo's log file, not the report.
"""

from __future__ import annotations

import json
import os
import sys


def main(dag_id: str, conf: str, output: str) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        raise SystemExit(f"DAG import errors: {bag.import_errors}")
    run = bag.get_dag(dag_id).test(run_conf=json.loads(conf))
    with create_session() as session:
        xcoms = (
            session.query(XComModel).filter(XComModel.dag_id == dag_id, XComModel.run_id == run.run_id).all()
        )
        outcome = {
            "state": str(run.state),
            "tasks": {ti.task_id: str(ti.state) for ti in run.get_task_instances()},
            "xcoms": {f"{x.task_id}.{x.key}": x.value for x in xcoms if not x.key.startswith("_link_")},
        }
    with open(output, "w") as file:
        json.dump(outcome, file, default=str)


if __name__ == "__main__":
    main(*sys.argv[1:4])
