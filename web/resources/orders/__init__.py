"""Orders: one order with its items and payment status."""
