"""Plugins defined in test modules and named by dotted path, as a user's own code would be."""
