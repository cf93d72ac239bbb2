"""Tessera's kernel: actors, mailboxes, ZMQ transport, the wire codec and the supervisor.

The kernel knows nothing of models: it moves typed records between processes and keeps them alive.
"""
