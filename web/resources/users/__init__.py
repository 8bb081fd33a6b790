"""Users: a user and their latest orders."""
