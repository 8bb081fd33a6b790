"""The `eventpipe` command: the one composition root, allowed to import every role."""

import os

# prometheus_client's own variable, taken out before anything imports the library: an
# operator's command is no process of a multi-process server. Left set (a shell in the API's
# container has it), the command would write its samples into the server's directory, where
# the server's /metrics counts them for ever after, or fail at its first import where the
# directory is not made yet. `eventpipe web` hands it on to the server it starts.
SERVER_METRICS_DIR = os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
