from dagster import DynamicPartitionsDefinition

# One key per drop folder; added by new_drop_sensor (or `cvops ingest`).
drops_partitions = DynamicPartitionsDefinition(name="drops")

# One key per uploaded feedback batch; added by feedback_sensor (or the demo).
feedback_partitions = DynamicPartitionsDefinition(name="feedback_batches")
