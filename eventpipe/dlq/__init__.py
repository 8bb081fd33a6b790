"""The dead-letter queue: what could never apply, kept with everything needed to replay it."""
