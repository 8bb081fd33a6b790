"""`eventpipe up` and `eventpipe worker`: starting and supervising the pipeline's processes.

Embedded brokers for a machine with none, child processes that never outlive their parent,
the worker supervisor and the demo. Above the roles: it starts them as commands and never
runs their code in its own process.
"""
