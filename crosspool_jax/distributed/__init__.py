"""Multi-host CrossPool: the pools over the devices of several processes (jax.distributed).

`cluster` joins the group, `channel` carries the leader's step plans to the followers (and their
heartbeats back), `step` is the leader's runner and the followers' replay, `engine` the engine and
the two roles of `crosspool serve`. docs/deploy.md says how to run it and what has been run.
"""
