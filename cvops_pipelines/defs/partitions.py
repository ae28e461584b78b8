from dagster import DynamicPartitionsDefinition

# One key per drop folder; added by new_drop_sensor (or `cvops ingest`).
drops_partitions = DynamicPartitionsDefinition(name="drops")
