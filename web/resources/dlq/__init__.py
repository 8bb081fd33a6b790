"""The dead-letter queue over HTTP, behind a bearer token."""
