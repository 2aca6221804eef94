"""Worker extension: the RPC methods through which the API process reads the model's counters.

Installed with `--worker-extension-cls remix_serve.vllm_plugin.worker:RemixWorkerExtension` (remix-serve sets it)
and called with `collective_rpc("remix_counts")`.
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

    def remix_record(self, on: bool) -> dict[int, list[list[int]]] | None:
        return self._remix_model().remix_record(on)
