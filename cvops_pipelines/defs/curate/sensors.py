"""Curate runs itself: eager automation refreshes the pool, label QA and the dataset version
whenever an upstream drop is (re)ingested. This sensor evaluates those conditions (the daemon
runs it; `./dev ui` starts the daemon)."""

from dagster import (AssetSelection, AutomationConditionSensorDefinition, DefaultSensorStatus,
                     define_asset_job)

curate_job = define_asset_job("curate_job", selection=AssetSelection.groups("curate"),
                              description="Rebuild the labeled pool, label QA and the dataset "
                                          "version from every ingested drop.")

automation_sensor = AutomationConditionSensorDefinition(
    "cvops_automation", target=AssetSelection.all(), default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Materializes assets whose automation condition (e.g. eager) is met.")
