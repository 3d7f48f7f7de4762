"""Everything that knows about more than one process: the launch environment, collectives, and the
DeepSpeed engine the model is wrapped in."""
