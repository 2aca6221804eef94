"""The adapter pool: many ReMix checkpoints on one base, each request's checkpoint carried on vLLM's `LoRARequest`,
the checkpoints' LoRA banks in fixed-size pages of one pool that the model owns (docs/architecture.md,
"Multi-checkpoint pool").

- `model.py`: `AdapterPool` (page stores, per-slot routers and page tables, per-checkpoint counts), `PoolMLP`, the
  `RemixPool<Base>` model classes.
- `delta.py`: the PyTorch reference of the per-layer routing and page delta (the kernels' contract) and the
  dispatch to the CPU (csrc/remix_cpu.cpp) and GPU kernels.
- `pages.py`: which pages hold which LoRA's rank chunks, residency, LRU eviction to host, pins. Pure Python.
- `sizing.py`: bytes per page, `--pool-size`, the pool's sizes from the start-up checkpoints. Pure Python.
- `admission.py`: which checkpoints a pool can serve; the worker and the API server's load route share it.
- `vllm_hooks.py`: the version-guarded vLLM 0.32.0 surface: the ReMix adapter loader, the `remix_anchor` layer,
  slot events from the LoRA manager, each token's slot.
- `resolver.py`: the `--adapter-dir` LoRA resolver.
"""
