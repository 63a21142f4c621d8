"""Airflow plugin package for Ray jobs: REST hook, deferrable operator, async trigger, links."""
