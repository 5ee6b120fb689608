"""Unit tests of the handler's parts (pool, plan table, turnstile): no database, no sleeps."""
