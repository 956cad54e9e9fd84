"""On GPUs SelfExtend runs in its own attention backend, chosen with `--attention-backend CUSTOM`; an engine that
asks for SelfExtend and gets another backend for a layer that needs it is refused at start-up, never run as
plain vLLM. vLLM has no public hook for that check, so this module wraps the platform's backend choice
(`Platform.get_attn_backend_cls`, vLLM 0.32): the one place the plugin patches vLLM.
"""

from __future__ import annotations

from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType

from .settings import SelfExtendVLLMError, engine_settings, requested


def refuse_other_backends(platform, backend_path: str) -> None:
    """Make `platform`'s backend choice refuse, when SelfExtend is asked for, any backend but `backend_path` for
    a full-attention decoder layer (sliding-window and encoder layers may run any backend)."""
    choose = platform.get_attn_backend_cls
    if getattr(choose, "selfextend_checked", False):
        return

    def checked(selected_backend, attn_selector_config, *args, **kwargs) -> str:
        path = choose(selected_backend, attn_selector_config, *args, **kwargs)
        config = get_current_vllm_config()
        if path == backend_path or requested(config) is None:
            return path  # SelfExtend's own backend, or plain vLLM
        if attn_selector_config.attn_type != AttentionType.DECODER or attn_selector_config.has_sliding_window:
            return path  # layers SelfExtend leaves alone
        engine_settings(config)  # settings that cannot run are refused first, as on CPU
        if attn_selector_config.use_mla:
            raise SelfExtendVLLMError("SelfExtend does not run with multi-head latent attention (MLA)")
        raise SelfExtendVLLMError(f"SelfExtend runs on GPUs in its own attention backend, and vLLM chose "
                                  f"{path.rsplit('.', 1)[-1]}: add --attention-backend CUSTOM (Python: "
                                  "attention_config={\"backend\": \"CUSTOM\"})")

    checked.selfextend_checked = True
    platform.get_attn_backend_cls = checked
