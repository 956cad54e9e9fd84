"""SelfExtend and STRING inside vLLM, as an out-of-tree plugin: no fork, vLLM's own engine, scheduler,
paged KV cache, chunked prefill, prefix caching and OpenAI server.

vLLM calls `register` (entry point `vllm.general_plugins`) in each of its processes before it builds a
model. On CPU it puts SelfExtend's backend where vLLM's CPU_ATTN is (`cpu_backend.py`); on GPUs it registers
SelfExtend's backend over vLLM's TRITON_ATTN as CUSTOM (`gpu_backend.py`, chosen with `--attention-backend
CUSTOM`; not run on a GPU here). Both share `layer.py`, which attends with the project's kernels. A model runs
exactly as in plain vLLM unless SelfExtend is asked for, by `--additional-config '{"selfextend": {...}}'` or by
a `selfextend` entry in the model's config.json (what `selfextend.apply` and `save_pretrained` write); then the
settings are checked and planned at start-up (`settings.py`) and what cannot run is refused there, a GPU engine
without the CUSTOM backend included (`backend_choice.py`). This package imports without vLLM installed; vLLM is
imported only inside `register`.
"""

from __future__ import annotations

CPU_BACKEND = "selfextend.vllm.cpu_backend.SelfExtendCPUBackend"
GPU_BACKEND = "selfextend.vllm.gpu_backend.SelfExtendGPUBackend"


def register() -> None:
    """vLLM's plugin hook. On CPU, SelfExtend's backend takes CPU_ATTN's place (it is CPU_ATTN for every layer
    and request SelfExtend leaves alone). On GPUs it is registered as CUSTOM, and an engine asking for SelfExtend
    with another backend is refused at start-up. vLLM does not catch a plugin's errors, so in a vLLM whose
    internals differ from the tested release's the plugin says so and registers nothing, rather than stop
    every engine of that installation."""
    try:
        from vllm.platforms import current_platform
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        if current_platform.is_cpu():
            register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
            return
        from .backend_choice import refuse_other_backends

        register_backend(AttentionBackendEnum.CUSTOM, GPU_BACKEND)
        refuse_other_backends(current_platform, GPU_BACKEND)
    except (ImportError, AttributeError) as error:
        import vllm
        from vllm.logger import init_logger

        from .settings import TESTED_VLLM

        init_logger("vllm.selfextend").warning(
            "SelfExtend's plugin cannot register in vLLM %s (tested: %s): %s. SelfExtend asked for here runs as "
            "plain vLLM; install vllm==%s", vllm.__version__, TESTED_VLLM, error, TESTED_VLLM)
