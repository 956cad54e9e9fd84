"""Tiny seeded models of every covered family, and the --runslow switch."""

from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import ByteLevelBPETokenizer

TRAIN_LENGTH = 64
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=TRAIN_LENGTH, tie_word_embeddings=False)


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))


def _llama3():
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, rope_parameters=rope))


def _mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=None))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON))


def _qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, head_dim=16))


def _phi3():
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _gemma3():
    config = transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 4}, head_dim=16, query_pre_attn_scalar=16, sliding_window=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    return transformers.Gemma3ForCausalLM(config)


FAMILIES = {"llama": _llama, "llama3": _llama3, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3,
            "phi3": _phi3, "gemma3": _gemma3}


def make_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random model of `family`, float32, eval mode, with vanilla SDPA attention."""
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    model.set_attn_implementation("sdpa")
    return model


@torch.no_grad()
def check_greedy_generate_is_recompute(model: transformers.PreTrainedModel, ids: torch.Tensor, new_tokens: int) -> None:
    """Greedy `generate` (decoding over its cache) gives the tokens of recomputing the whole sequence each step."""
    generated = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    recomputed = ids
    for _ in range(new_tokens):
        next_token = model(recomputed, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        recomputed = torch.cat([recomputed, next_token], dim=1)
    assert torch.equal(generated, recomputed)


def make_profile(identity: str = "x", effective: int = 24, train: int = TRAIN_LENGTH, methods: dict | None = None):
    """A measured profile of effective length `effective`, with an optional SelfExtend/STRING comparison."""
    from selfextend.planning import Profile

    return Profile(identity, "tiny", train, effective, 0.9, {effective: {"correct": 6, "total": 6, "passed": True}},
                   {}, "2026-11-23", 1.0, methods=methods or {})


def save_tokenizer(folder) -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer trained here (under 300 tokens), saved into `folder`."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["The grass is green. The sky is blue. pass key 12345"], vocab_size=300,
                            special_tokens=["<pad>", "<s>", "</s>"])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Llama and a byte-level tokenizer trained here, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = save_tokenizer(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer)}, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def no_c_compiler(tmp_path, monkeypatch):
    """No compiler and no built kernels: a native kernel that is needed must be built, and cannot be."""
    from selfextend import native
    from selfextend.attention import few_native
    from selfextend import linear_native

    def clear():
        for cached in (native.load, linear_native.library, few_native.library, few_native.available):
            cached.cache_clear()

    monkeypatch.setenv("SELFEXTEND_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CC", "/no/such/cc")
    clear()
    yield
    clear()


@pytest.fixture
def rotated_keys(monkeypatch) -> list[int]:
    """How many keys each grouped-key rotation rotated, in call order: shows whether kept grouped keys were used."""
    from selfextend.rotary import GroupedRotation

    sizes: list[int] = []
    rotate = GroupedRotation.__call__

    def counting(self, x, positions, kind):  # positions: a tensor, or the first of consecutive ones
        if kind == "key":
            sizes.append(x.shape[2])
        return rotate(self, x, positions, kind)

    monkeypatch.setattr(GroupedRotation, "__call__", counting)
    return sizes


def wait_until_healthy(url: str, process, log_path, seconds: float) -> None:
    """Wait for `url`/health; fail with the server's log if it exits or takes longer than `seconds`."""
    from selfextend.serving.local import wait_until_healthy as healthy

    if not healthy(url, process, seconds):
        pytest.fail(f"the server did not start:\n{open(log_path).read()[-4000:]}")


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
