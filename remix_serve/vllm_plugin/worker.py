"""Worker extension: the RPC methods through which the API process reads the model's counters.

Installed with `--worker-extension-cls remix_serve.vllm_plugin.worker:RemixWorkerExtension` (remix-serve sets it)
and called with `collective_rpc("remix_counts")`; `remix_compilation` and `remix_bank_path` tell how the worker runs
the model, and the `remix_pool_*` methods serve a multi-checkpoint model's pool.
"""

from __future__ import annotations


class RemixWorkerExtension:
    """Mixed into vLLM's worker class; `self.model_runner` is the worker's model runner."""

    def _remix_model(self):
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        if not hasattr(model, "remix_counts"):
            raise RuntimeError(f"the served model {type(model).__name__} is not a ReMix model")
        return model

    def remix_counts(self) -> dict[str, list]:
        return self._remix_model().remix_counts()

    def remix_reset_counts(self) -> None:
        self._remix_model().remix_reset_counts()

    def remix_pool_stats(self) -> dict:
        """The multi-checkpoint pool's pages, residency and load/eviction counters (pool/model.py)."""
        return self._remix_model().remix_pool_stats()

    def remix_pool_forget(self, name: str) -> bool:
        """Free a checkpoint's pool pages after vLLM removed its adapter; False when the pool does not know it."""
        return self._remix_model().remix_pool_forget(name)

    def remix_pool_trace(self, on: bool) -> list[dict[str, int]] | None:
        """Start or stop tracing the distinct pool pages each forward selects (pool/model.py `set_trace`)."""
        return self._remix_model().remix_pool_trace(on)

    def remix_bank_path(self) -> str:
        """How a one-checkpoint model applies its bank: "fused" or "gather" (model.py, `resolve_bank_path`)."""
        return self._remix_model().remix_bank_path

    def remix_record(self, on: bool) -> dict[int, list[list[int]]] | None:
        return self._remix_model().remix_record(on)

    def remix_compilation(self) -> dict[str, int | str]:
        """How this worker runs the model: vLLM's compilation mode, CUDA-graph mode and compilation counters
        (graphs traced, compiled, captured) and how many modules were compiled, so a check can tell that a
        compiled path really ran compiled."""
        import dataclasses

        from vllm.compilation.counter import compilation_counter

        config = self.vllm_config.compilation_config  # type: ignore[attr-defined]
        # Modules under vLLM's @support_torch_compile that have been traced and compiled (the decoder)
        compiled = [m for m in self._remix_model().modules() if getattr(m, "compiled", False) is True]
        return {
            "mode": int(config.mode),
            "cudagraph_mode": str(config.cudagraph_mode),
            "compiled_modules": len(compiled),
            **dataclasses.asdict(compilation_counter),
        }
