"""The adapter pool for serving many ReMix checkpoints on one base (issue 14): foundation only, not used yet.

Today's serving holds one checkpoint, fused into the base weights (`vllm_plugin/model.py`); nothing here changes
it. The design (docs/architecture.md, "Multi-checkpoint pool", from the vLLM 0.32.0 source) carries each
request's checkpoint on vLLM's own `LoRARequest` and keeps the checkpoints' LoRA banks in a pool of device pages
that the model owns:

- `pages.py`: which pages hold which LoRA's rank chunks, residency, LRU eviction to host, pins, the dense page
  table a kernel indexes. Pure Python, no torch, no vLLM, so all of it is tested without an engine.
- `sizing.py`: bytes per page, pages for a byte budget or for N checkpoints, the split between the two stores.
- `vllm_hooks.py`: the version-guarded vLLM surface: a ReMix-aware `WorkerLoRAManager._load_adapter`, the
  `remix_anchor` layer that gives vLLM one module to wrap, slot events from the LoRA manager, and each token's
  slot read from the punica wrapper. Tested against the pinned wheel with vLLM's real LoRA manager classes.

How it will connect (the integration step, not done yet):

1. `register()` (`vllm_plugin/__init__.py`) calls `vllm_hooks.install()`; remix-serve starts vLLM with
   `--enable-lora --lora-target-modules remix_anchor --max-lora-rank 1` and each checkpoint as a LoRA module.
2. The model: a multi-checkpoint `RemixModelMixin` gets `vllm_hooks.add_anchor(self)` and
   `vllm_hooks.SlotEventsMixin`, allocates the page stores at `__init__` (so vLLM's memory profiling counts them:
   per store `A [pages, r_page, in]`, `B [pages, out, r_page]`, sized with `sizing.py`), a `PagePool` over them,
   and per slot a router table `[max_loras, L, n_max, D]` (float32) and a page table
   `[max_loras, L, 3, n_max, pages_per_lora_max]` (int32, from `PagePool.dense_table`). Its `SlotEvents` callback,
   on `reset_lora(slot)`: unpin the slot's previous checkpoint, `add` (first time) and `acquire(name, pin=True)`
   the new one, copy its pages in when `acquire` says they are fresh (`page_rows` gives each page's rank rows;
   zero the tail), write its routers and table row; a dummy (warm-up) adapter disables the slot.
3. Forward, per adapted layer: `vllm_hooks.token_slots(self, T)` gives each token's slot (-1 = base); route with
   the slot's router, mask LoRAs past the checkpoint's n, top-k with `routing.py`'s tie rule, map ids to pages
   through the slot's table row, shrink and expand over the pages (CPU: page-indirect gathers in
   `csrc/remix_cpu.cpp`; GPU: vLLM's `fused_moe_lora` with pages as experts), add to gate_up/down outputs;
   slot -1 and page -1 skip the bank. The fused single-checkpoint path stays for `--adapter`.
4. The CLI and routes: `--adapter` repeated and `--adapter-dir`, a pool flag in bytes or checkpoints, loads and
   unloads through vLLM's `/v1/load_lora_adapter` (validated and restricted to allowed roots in the endpoint
   plugin) and an unload that also calls `engine_client.remove_lora` and frees the pool's pages.
5. Metrics: per-checkpoint `remix_*` (the `model_name` label is the LoRA name), pool gauges and the counters of
   `PagePool.stats()` (loads, reloads, evictions, pages used/free/total per store).
"""
