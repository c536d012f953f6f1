"""All N nodes in one process, the oracle: ``partition()`` and :class:`PartitionedModel`
(``model``), byte accounting (``comm``), budget training of the gates (``budget``), export of
the plan and per-node shards and shard-only execution (``export``), slices sized by the
devices' capacities (``capacity``)."""
