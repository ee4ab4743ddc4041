"""Memory: where things live and who may use it.

`arena` (one paged arena per device: model weights as page runs, KV pages, the model classes'
row layouts), `kv_virtualizer` (KV pages of every model's requests over the KV devices, split-KV
segments, host swap slots; its parts are `kv_types`, `kv_config`, `kv_requests`, `kv_allocation`,
`kv_swap` and `kv_accounting`), `planner` (admission, growth, preemption: the KV planner, plain
Python; its parts are `planner_config`, `planner_types`, `request_book`, `preemption` and
`admission`), `topology` (the device split into a KV pool and a weights pool).
"""
