"""Code written against other libraries' internals, behind one gate.

Each module here computes what transformers or torch would compute, faster, by reaching into
their internals: a pruned last decoder layer (`last_layer`), a decode step of our own
(`lean_decode`), a preallocated KV cache (`kv_cache`), fp32 linear layers on oneDNN
(`onednn_linear`), glibc's heap trimming (`host_memory`). Internals change between releases, so
none of them runs unless `gate.fast_path_allowed` says so: the installed versions are inside the
tested window, the model's architecture is one the fast path knows, and the fast path matched the
stock computation on a tiny model of the same architecture the first time it was asked for in this
process. Otherwise the stock path runs and one `FastPathWarning` says which fast path was turned
off and why. `compat` holds the spellings of transformers' API that changed between releases.

Importing this package imports nothing heavy: `host_cpu`-style callers may use it before torch.
"""
