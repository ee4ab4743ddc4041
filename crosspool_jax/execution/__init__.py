"""Execution: the step programs and what runs them.

`pooled_step` (one jitted step program over both pools: lanes of model classes, layers as loops, KV
written in place), `host_step` (the same step scheduled layer by layer from the host, one call per
pool), `pool_runner` (`GroupRunner`: planner -> inputs -> program calls -> tokens), with
`step_calls` (a step's work as program calls: lanes, dispatch), `lane_inputs` (a lane's host
inputs), `step_programs` (which compiled program serves a call, background and ahead-of-time
compiles), `step_grid` (the bucket grid of program shapes), `warm_programs` (a new lane's warm-up
plan), `runner_models` (placing, sleeping, waking, removing models) and `runner_records` (requests,
calls, step results), `sampling` (on-device token sampling), `compile_cache` (JAX's persistent
compilation cache).
"""
