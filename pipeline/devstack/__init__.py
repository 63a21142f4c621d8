"""The local development stack: what ``make demo`` and the test suite start on this machine in
place of production services, and stop afterwards (nothing is assumed to be running).

- ``ray_cluster``: a token-authenticated Ray head and worker nodes joined to it.
- ``postgres``: a private PostgreSQL server (Airflow's and MLflow's database in production).
- ``mlflow_server``: an ``mlflow server`` serving runs, the registry and artifacts.
- ``host``: this machine's addresses, free ports, stopping a server started in its own session.
- ``local_training``: the training recipe on this machine without Ray, one process per rank.
- ``demo``: ``pipeline demo``, the whole DAG once with ``dag.test()`` on a local Ray head.

Dev tooling: it may import the library, but no stage and nothing on the Airflow side reaches it
(``tests/unit/test_import_rules.py``).
"""
