"""Everything that knows about more than one process: launch environment, collectives, DeepSpeed engine, accumulation, pre-emption."""
