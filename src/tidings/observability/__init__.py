"""What the runtime tells about itself: traces (`tracing`) and metrics, beside the logs.

Nothing here is imported by the bus or the store: the runtime, the gateway, the LLM
layer and the client call in, and this package imports only `tidings.events`,
`tidings.errors` and `tidings.config`.
"""
