"""The `eventpipe` command: the one composition root, allowed to import every role."""
