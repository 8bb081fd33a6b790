"""The producer CLI: publish events by hand from a menu, or generate realistic streams."""
