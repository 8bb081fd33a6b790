"""The read API: Flask-Smorest service over the read model."""
