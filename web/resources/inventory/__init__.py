"""Inventory: the stock of one SKU."""
