"""Pure-Python scheduling: the KV block pool with prefix caching, request state, step planning."""
