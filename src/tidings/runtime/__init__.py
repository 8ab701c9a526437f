"""Running agents: filters, the pipeline, outcomes and the worker."""
