"""Does donating an array built with make_array_from_single_device_arrays over another array's
device buffer (what crosspool_jax/execution/host_step.py does with the arena's KV buffers) update it in place
on this platform? Prints the buffer pointers, donation warnings and peak memory."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

d = jax.devices()[0]
mesh = Mesh(np.array([d]), ("pool",))
sh = NamedSharding(mesh, P("pool"))
a = jax.jit(lambda: jnp.zeros((1 << 30,), jnp.bfloat16), out_shardings=sh)()  # 2 GiB "arena"
jax.block_until_ready(a)
sub_mesh = Mesh(np.array([d]), ("pool",))
view = jax.make_array_from_single_device_arrays(a.shape, NamedSharding(sub_mesh, P("pool")),
                                                [s.data for s in a.addressable_shards])
p0 = view.unsafe_buffer_pointer()
f = jax.jit(lambda x, i: x.at[i].set(1), donate_argnums=0)
with warnings.catch_warnings(record=True) as ws:
    warnings.simplefilter("always")
    out = f(view, 5)
    out.block_until_ready()
st = d.memory_stats() or {}
print("same buffer after donation:", out.unsafe_buffer_pointer() == p0, "| view deleted:", view.is_deleted(),
      "| original deleted:", a.is_deleted(), "| warnings:", [str(w.message)[:120] for w in ws],
      "| peak GiB:", round(st.get("peak_bytes_in_use", 0) / 2**30, 2), "| value:", float(out[5]))
