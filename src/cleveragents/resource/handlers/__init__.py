"""Built-in resource handlers."""
