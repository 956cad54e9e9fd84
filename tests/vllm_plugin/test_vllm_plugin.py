"""SelfExtend and STRING inside vLLM (CPU), through the plugin's entry point: greedy tokens and log-probabilities
equal transformers + `selfextend.apply` past the training length, with concurrent requests of different
lengths (continuous batching), chunked prefill and prefix-cache hits; sliding-window layers keep vLLM's own
kernel; what cannot run is refused at start-up. Runs only where vLLM is installed (.ci/run's vLLM stage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

vllm = pytest.importorskip("vllm")

import selfextend  # noqa: E402
from selfextend.testbed import WEIGHTS as TESTBED  # noqa: E402
from selfextend.vllm.settings import SelfExtendVLLMError, cores_note, engine_settings  # noqa: E402
from conftest import COMMON, save_tokenizer, wait_until_healthy  # noqa: E402
from selfextend.serving.local import free_port  # noqa: E402

HELPER = Path(__file__).parent.parent / "helpers" / "vllm_generate.py"
LOGPROB_TOLERANCE = 2e-5  # two implementations of the same float32 model: vLLM's layers and transformers'
SHAPE = {**COMMON, "hidden_size": 128, "head_dim": 32, "vocab_size": 300}  # vLLM's CPU kernel: head_dim >= 32


def _save(tmp_path: Path, name: str, model: transformers.PreTrainedModel) -> str:
    folder = tmp_path / name
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return str(folder)


def _llama(tmp_path: Path) -> str:
    torch.manual_seed(0)
    return _save(tmp_path, "llama", transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)))


def _prompts(lengths: list[int], seed: int = 0, vocab: int = 290) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def _vllm(tmp_path: Path, engine: dict, rounds: list[list[list[int]]], max_tokens: int = 8,
          env: dict | None = None) -> list[list[dict]]:
    return _vllm_run(tmp_path, engine, rounds, max_tokens, env)["rounds"]


def _vllm_run(tmp_path: Path, engine: dict, rounds: list[list[list[int]]], max_tokens: int = 8,
              env: dict | None = None, backend: str = "cpu") -> dict:
    """The helper's whole answer: each round's outputs, and the keys each SelfExtend layer rotated."""
    request, out = tmp_path / "request.json", tmp_path / "out.json"
    request.write_text(json.dumps({"engine": engine, "rounds": rounds, "max_tokens": max_tokens,
                                   "backend": backend}))
    done = subprocess.run([sys.executable, str(HELPER), str(request), str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return {**json.loads(out.read_text()), "log": done.stdout + done.stderr}


def _vllm_refuses(tmp_path: Path, engine: dict) -> str:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"engine": engine, "rounds": [], "max_tokens": 1}))
    done = subprocess.run([sys.executable, str(HELPER), str(request), str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    return done.stdout + done.stderr


def _reference(folder: str, prompt: list[int], max_tokens: int, **settings) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities from transformers with the same settings applied."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: always max_tokens
    selfextend.apply(model, **settings)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [step[0].float().log_softmax(-1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def _assert_same(got: dict, expected: tuple[list[int], list[float]]) -> None:
    assert got["tokens"] == expected[0]
    torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(expected[1]), atol=LOGPROB_TOLERANCE,
                               rtol=0)


def _tokens_computed(prompts: list[list[int]], outputs: list[dict], max_tokens: int) -> int:
    """Tokens whose keys vLLM wrote: each prompt's uncached part and every generated token but the last."""
    return sum(len(p) - got["cached"] + max_tokens - 1 for p, got in zip(prompts, outputs))


def test_selfextend_past_the_training_length_batched_chunked_and_from_the_prefix_cache(tmp_path):
    """L = 64, read up to 200 tokens (G = 4, W = 16): four requests at once, prefill chunks of 48 tokens,
    then a request sharing the longest prompt's first 160 tokens, served from vLLM's prefix cache. Each layer
    keeps its grouped keys: it rotates every new key once and no other (the cached prefix's came with it)."""
    folder = _llama(tmp_path)
    first = _prompts([150, 40, 10, 190])
    second = [first[3][:160] + _prompts([20], seed=1)[0]]
    engine = {"model": folder, "max_model_len": 200, "hf_overrides": {"max_position_embeddings": 200},
              "additional_config": {"selfextend": {"group_size": 4, "window_size": 16}},
              "max_num_batched_tokens": 48, "block_size": 32, "enable_prefix_caching": True}
    run = _vllm_run(tmp_path, engine, [first, second])
    assert run["log"].count("SelfExtend (additional_config): G=4, W=16,") == 1  # said once, at start-up
    rounds = run["rounds"]
    assert rounds[1][0]["cached"] >= 128  # whole blocks of the shared prefix came from the cache
    computed = _tokens_computed(first + second, rounds[0] + rounds[1], 8)
    assert run["keys_rotated"] == [computed] * SHAPE["num_hidden_layers"]
    assert all(set(calls) == {"native"} for calls in run["kernel_calls"])  # decode steps and 48-token chunks
    for prompt, got in zip(first + second, rounds[0] + rounds[1]):
        _assert_same(got, _reference(folder, prompt, 8, group_size=4, window_size=16))


def test_string_and_the_settings_a_saved_model_keeps_without_a_c_compiler(tmp_path):
    """STRING (S = 21, w = 10 at L = 64) from config.json's `selfextend` entry, written by apply +
    save_pretrained: no --additional-config needed. With no C compiler, the native kernel cannot be built:
    the engine says so once and runs the torch paged kernel, with the same tokens."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
    folder = _save(tmp_path, "string", selfextend.apply(model, method="string"))
    prompts = _prompts([56, 30, 12], seed=2)
    run = _vllm_run(tmp_path, {"model": folder, "max_model_len": 64}, [prompts], env={"CC": "/no/such/cc"})
    assert run["log"].count("run the torch paged kernel") == 1 and "no C compiler ('/no/such/cc')" in run["log"]
    assert all(set(calls) == {"torch paged"} for calls in run["kernel_calls"])
    rounds = run["rounds"]
    for prompt, got in zip(prompts, rounds[0]):
        _assert_same(got, _reference(folder, prompt, 8, method="string"))


def test_gemma3_sliding_layers_and_qwen3_planned(tmp_path):
    """Gemma 3: its sliding-window layers stay vLLM's; Qwen3: G and W planned for max_model_len, a long prompt
    prefilled by the blockwise kernel and a short one (and the decode steps) by the native one."""
    torch.manual_seed(0)
    gemma = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **{**SHAPE, "num_hidden_layers": 4}, query_pre_attn_scalar=32, sliding_window=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]))
    folder = _save(tmp_path, "gemma3", gemma)
    prompts = _prompts([150, 70], seed=3)
    engine = {"model": folder, "max_model_len": 200, "hf_overrides": {"max_position_embeddings": 200},
              "additional_config": {"selfextend": {"group_size": 4, "window_size": 16}}}
    for prompt, got in zip(prompts, _vllm(tmp_path, engine, [prompts])[0]):
        _assert_same(got, _reference(folder, prompt, 8, group_size=4, window_size=16))

    torch.manual_seed(0)  # L = 512, read to 1200: a row past NATIVE_KEYS prefills through the blockwise kernel
    qwen = _save(tmp_path, "qwen3", transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **{**SHAPE, "max_position_embeddings": 512})))
    planned = selfextend.planning.resolve(512, 1200, method="selfextend").settings
    engine = {"model": qwen, "max_model_len": 1200, "hf_overrides": {"max_position_embeddings": 1200},
              "additional_config": {"selfextend": {}}}
    prompts = _prompts([1100, 600], seed=4)
    run = _vllm_run(tmp_path, engine, [prompts])
    assert all(set(calls) == {"native", "blockwise"} for calls in run["kernel_calls"])
    assert run["threads_placed_by"] == "vLLM's CPU worker"  # the blockwise kernel's busy-machine workers stay off
    for prompt, got in zip(prompts, run["rounds"][0]):
        _assert_same(got, _reference(qwen, prompt, 8, group_size=planned.group_size,
                                     window_size=planned.window_size))


def test_the_testbed_at_four_times_its_training_length_rotating_the_keys_it_reads(tmp_path):
    """keep_grouped_keys false: each step rotates the grouped keys it reads, with the same tokens."""
    prompts = _prompts([500, 300], seed=5, vocab=transformers.AutoConfig.from_pretrained(TESTBED).vocab_size)
    engine = {"model": str(TESTBED), "max_model_len": 512, "hf_overrides": {"max_position_embeddings": 512},
              "additional_config": {"selfextend": {"group_size": 6, "window_size": 32, "keep_grouped_keys": False}}}
    run = _vllm_run(tmp_path, engine, [prompts])
    for prompt, got in zip(prompts, run["rounds"][0]):
        _assert_same(got, _reference(str(TESTBED), prompt, 8, group_size=6, window_size=32))
    assert min(run["keys_rotated"]) > 2 * _tokens_computed(prompts, run["rounds"][0], 8)  # every step, again


def test_the_gpu_backend_run_on_cpu(tmp_path):
    """The GPU backend's code (TRITON_ATTN's cache layout and metadata; the torch paged kernel for decode steps and
    short chunks, the blockwise one for long chunks), run on CPU in vLLM's engine. vLLM's Triton kernel, which
    attends for requests within W, cannot run here, so every request reaches past W from its first chunk (one
    that did not would fail the run). Tokens equal transformers'; each new key is rotated once, also after a
    prefix-cache hit. Then STRING on a tiny Llama, rotating the grouped keys it reads at each step."""
    vocab = transformers.AutoConfig.from_pretrained(TESTBED).vocab_size
    first = _prompts([500, 300, 40], seed=8, vocab=vocab)
    second = [first[0][:448] + _prompts([40], seed=9, vocab=vocab)[0]]
    engine = {"model": str(TESTBED), "max_model_len": 512, "hf_overrides": {"max_position_embeddings": 512},
              "additional_config": {"selfextend": {"group_size": 6, "window_size": 32}}, "block_size": 32,
              "enable_prefix_caching": True}
    run = _vllm_run(tmp_path, engine, [first, second], backend="gpu")
    rounds = run["rounds"]
    assert rounds[1][0]["cached"] >= 416  # whole blocks of the shared prefix came from the cache
    layers = transformers.AutoConfig.from_pretrained(TESTBED).num_hidden_layers
    assert run["keys_rotated"] == [_tokens_computed(first + second, rounds[0] + rounds[1], 8)] * layers
    assert all(set(calls) == {"torch paged", "blockwise"} for calls in run["kernel_calls"])
    for prompt, got in zip(first + second, rounds[0] + rounds[1]):
        _assert_same(got, _reference(str(TESTBED), prompt, 8, group_size=6, window_size=32))

    folder = _llama(tmp_path)  # STRING (S = 21 at L = 64), grouped keys rotated at each step instead of kept
    prompts = _prompts([56, 30, 25], seed=10)
    engine = {"model": folder, "max_model_len": 64,
              "additional_config": {"selfextend": {"method": "string", "keep_grouped_keys": False}}}
    run = _vllm_run(tmp_path, engine, [prompts], backend="gpu")
    assert all(set(calls) == {"torch paged"} for calls in run["kernel_calls"]) and len(run["kernel_calls"]) == 2
    assert min(run["keys_rotated"]) > 2 * _tokens_computed(prompts, run["rounds"][0], 8)  # every step, again
    for prompt, got in zip(prompts, run["rounds"][0]):
        _assert_same(got, _reference(folder, prompt, 8, method="string"))


def test_tensor_parallel_two_processes_and_preempted_requests_recomputed(tmp_path):
    """tensor_parallel_size=2 on CPU (one core per rank): each rank attends with its own heads. A KV cache of
    8 blocks of 32 tokens for four requests needing 4-5 each: the scheduler preempts running requests, frees
    their blocks for others and recomputes them later. Blocks change hands, and the kept grouped keys with
    them: the tokens stay the reference's."""
    folder = _llama(tmp_path)
    prompts = _prompts([150, 130, 110, 90], seed=7)
    engine = {"model": folder, "max_model_len": 200, "hf_overrides": {"max_position_embeddings": 200},
              "additional_config": {"selfextend": {"group_size": 4, "window_size": 16}}, "tensor_parallel_size": 2,
              "block_size": 32, "num_gpu_blocks_override": 8, "disable_log_stats": False}
    run = _vllm_run(tmp_path, engine, [prompts], env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    assert run["preemptions"] > 0
    for prompt, got in zip(prompts, run["rounds"][0]):
        _assert_same(got, _reference(folder, prompt, 8, group_size=4, window_size=16))


def test_what_cannot_run_is_refused_at_start_up(tmp_path):
    folder = _llama(tmp_path)
    past = _vllm_refuses(tmp_path, {"model": folder, "max_model_len": 200,
                                    "hf_overrides": {"max_position_embeddings": 200},
                                    "additional_config": {"selfextend": {"group_size": 2, "window_size": 16}}})
    assert "max_model_len 200 is past what SelfExtend's G=2, W=16 reads" in past


def _fake_config(folder: str, max_model_len: int, selfextend_request: dict | None, table: int | None = None,
                 dcp: int = 1) -> SimpleNamespace:
    hf = transformers.AutoConfig.from_pretrained(folder)
    text = SimpleNamespace(max_position_embeddings=table or max_model_len)
    model = SimpleNamespace(model=folder, trust_remote_code=False, max_model_len=max_model_len, hf_config=hf,
                            hf_text_config=text)
    return SimpleNamespace(model_config=model, additional_config={} if selfextend_request is None else
                           {"selfextend": selfextend_request},
                           parallel_config=SimpleNamespace(decode_context_parallel_size=dcp,
                                                           prefill_context_parallel_size=1))


@pytest.mark.parametrize("request_, table, dcp, message", [
    ({"method": "string", "effective_length": 32}, None, 1, "STRING does not use it"),
    ({"method": "string"}, None, 1, "past the training length L = 64, and STRING does not extend"),
    ({"group_size": 4, "window_size": 16}, 64, 1, "add --hf-overrides '{\"max_position_embeddings\": 200}'"),
    ({"group_size": 4, "window_size": 16}, None, 2, "decode_context_parallel_size > 1"),
    ({"group_size": 4, "windows": 16}, None, 1, "unknown selfextend settings windows"),
    ({"group_size": 4, "window_size": 16, "keep_grouped_keys": "yes"}, None, 1, "must be true or false"),
])
def test_settings_refusals(tmp_path, request_, table, dcp, message):
    folder = _llama(tmp_path)
    with pytest.raises(SelfExtendVLLMError, match=message.replace("(", r"\(").replace("{", r"\{")):
        engine_settings(_fake_config(folder, 200, request_, table, dcp))
    assert engine_settings(_fake_config(folder, 64, None)) is None  # not asked for: plain vLLM


def test_kept_keys_with_a_kv_connector_are_refused(tmp_path):
    """A KV connector fills blocks that never pass through attention: their grouped keys could not be kept."""
    folder = _llama(tmp_path)
    config = _fake_config(folder, 200, {"group_size": 4, "window_size": 16})
    config.kv_transfer_config = SimpleNamespace(kv_connector="OffloadingConnector")
    with pytest.raises(SelfExtendVLLMError, match='add "keep_grouped_keys": false'):
        engine_settings(config)
    config.additional_config["selfextend"]["keep_grouped_keys"] = False
    assert engine_settings(config).keep_grouped_keys is False


def test_grouped_keys_are_kept_by_default_on_cpu_and_rotated_on_gpus_unless_asked(tmp_path, monkeypatch):
    """On a GPU vLLM gives its KV cache all the memory it may use, so kept grouped keys (half as much again) are
    off unless asked for; on CPU they are on unless turned off."""
    from vllm.platforms import current_platform

    folder = _llama(tmp_path)
    asked = {"group_size": 4, "window_size": 16}
    assert engine_settings(_fake_config(folder, 200, asked)).keep_grouped_keys is True
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    assert engine_settings(_fake_config(folder, 200, asked)).keep_grouped_keys is False
    assert engine_settings(_fake_config(folder, 200, {**asked, "keep_grouped_keys": True})).keep_grouped_keys is True


def test_an_untested_vllm_is_refused_when_selfextend_is_asked_for(tmp_path, monkeypatch):
    folder = _llama(tmp_path)
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(SelfExtendVLLMError, match=r"install vllm==0.32.0 \(on CPU"):
        engine_settings(_fake_config(folder, 200, {"group_size": 4, "window_size": 16}))


def test_on_gpus_the_plugin_registers_custom_and_refuses_selfextend_in_another_backend(tmp_path, monkeypatch):
    """On a GPU platform `register` makes SelfExtend's backend vLLM's CUSTOM; an engine asking for SelfExtend that
    gets another backend for a full-attention layer is refused at start-up, naming the flag. Sliding-window
    layers, engines without SelfExtend, and the CUSTOM backend itself pass. (Run here with the CPU platform
    told it is not a CPU, and a stand-in for its backend choice.)"""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends import registry
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from selfextend.vllm import GPU_BACKEND, backend_choice, register

    chosen = ["vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"]
    monkeypatch.setattr(registry, "_ATTN_OVERRIDES", dict(registry._ATTN_OVERRIDES))
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(current_platform, "get_attn_backend_cls", lambda selected, config, num_heads=None: chosen[0])
    register()
    register()  # every vLLM process calls it; the choice is wrapped once
    assert registry.AttentionBackendEnum.CUSTOM.get_path() == GPU_BACKEND
    config = _fake_config(_llama(tmp_path), 200, {"group_size": 4, "window_size": 16})
    monkeypatch.setattr(backend_choice, "get_current_vllm_config", lambda: config)
    full = AttentionSelectorConfig(head_size=32, dtype=torch.float32, kv_cache_dtype="auto", block_size=16)
    with pytest.raises(SelfExtendVLLMError, match="vLLM chose FlashAttentionBackend: add --attention-backend CUSTOM"):
        current_platform.get_attn_backend_cls(None, full, num_heads=4)
    with pytest.raises(SelfExtendVLLMError, match="latent attention"):
        current_platform.get_attn_backend_cls(None, full._replace(use_mla=True))
    assert current_platform.get_attn_backend_cls(None, full._replace(has_sliding_window=True)) == chosen[0]
    chosen[0] = GPU_BACKEND
    assert current_platform.get_attn_backend_cls(registry.AttentionBackendEnum.CUSTOM, full) == GPU_BACKEND
    chosen[0] = "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"
    config.additional_config = {}  # SelfExtend not asked for: plain vLLM, any backend
    assert current_platform.get_attn_backend_cls(None, full) == chosen[0]
    config.additional_config = {"selfextend": {"group_size": 4, "window_size": 16}}
    config.model_config = None  # vLLM choosing a backend with no model in its config: nothing to refuse
    assert current_platform.get_attn_backend_cls(None, full) == chosen[0]


def test_a_vllm_whose_internals_differ_gets_a_warning_not_a_stopped_engine(monkeypatch):
    """vLLM runs plugins unguarded: where its registry is not where the tested release has it, `register` says so
    (naming the tested release) and registers nothing, instead of raising in every engine of the installation."""
    import types

    import vllm.logger

    from selfextend.vllm import register

    monkeypatch.setitem(sys.modules, "vllm.v1.attention.backends.registry", types.ModuleType("registry"))
    said = []
    monkeypatch.setattr(vllm.logger, "init_logger",
                        lambda name: SimpleNamespace(warning=lambda line, *args: said.append(line % args)))
    register()
    assert len(said) == 1 and "cannot register in vLLM" in said[0] and "install vllm==0.32.0" in said[0]


def test_a_selfextend_layer_on_gpus_takes_no_fused_rope_or_quantized_output(tmp_path, monkeypatch):
    """vLLM may fuse RoPE with the cache write, or an fp8 quantization into attention's output, where a backend
    says it can: a SelfExtend layer says no (it keeps grouped keys from the rotated keys, and writes floats);
    a plain layer answers as TRITON_ATTN does."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticTensorSym

    from selfextend.vllm import layer
    from selfextend.vllm.gpu_backend import SelfExtendGPUImpl

    config = _fake_config(_llama(tmp_path), 200, {"group_size": 4, "window_size": 16})
    monkeypatch.setattr(layer, "get_current_vllm_config", lambda: config)
    extended = SelfExtendGPUImpl(4, 32, 0.2, 2, None, None, "auto")
    assert extended.rotation is not None
    assert not extended.fused_output_quant_supported(kFp8StaticTensorSym)
    assert not extended.fused_rope_kvcache_supported()
    config.additional_config = {}
    plain = SelfExtendGPUImpl(4, 32, 0.2, 2, None, None, "auto")
    assert plain.rotation is None and plain.fused_output_quant_supported(kFp8StaticTensorSym)


def test_a_model_left_one_core_of_several_by_vllms_binding_is_said():
    """vLLM's automatic binding keeps a core for its scheduler: on two cores the model runs on one. The worker
    says so, with the setting that gives it every core; a binding the user chose, or one core only, is left."""
    note = cores_note("auto", 1, 2)
    assert note is not None and "VLLM_CPU_OMP_THREADS_BIND=0-1" in note
    assert "1 thread" in note and "2 cores" in note
    for bind, threads, cores in (("0-1", 2, 2), ("0", 1, 2), ("0|1", 1, 2), ("auto", 1, 1), ("auto", 3, 4)):
        assert cores_note(bind, threads, cores) is None


def test_vllm_serve_with_the_plugin_answers_the_openai_client(tmp_path):
    """vLLM's OpenAI server as the README starts it, one request streamed and one not, tokens as transformers'.
    (vllm-cpu 0.32's `vllm` command looks up a distribution named "vllm" and fails; its server module runs.)"""
    import openai

    folder = _llama(tmp_path)
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "200",
               "--hf-overrides", '{"max_position_embeddings": 200}',
               "--additional-config", '{"selfextend": {"group_size": 4, "window_size": 16}}']
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server, log_path, 300)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        prompt = _prompts([170], seed=6)[0]
        expected = _reference(folder, prompt, 6, group_size=4, window_size=16)[0]
        extra = {"return_token_ids": True, "ignore_eos": True}
        whole = client.completions.create(model=folder, prompt=prompt, max_tokens=6, temperature=0, extra_body=extra)
        assert whole.choices[0].model_extra["token_ids"] == expected
        streamed = client.completions.create(model=folder, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                             extra_body=extra)
        tokens = [t for chunk in streamed for choice in chunk.choices for t in (choice.model_extra.get("token_ids")
                                                                                 or [])]
        assert tokens == expected
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _vllm_cache(layout: str, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor, lengths: list[int],
                n_blocks: int, block_size: int) -> torch.Tensor:
    """vLLM's cache [blocks, heads, block_size, 2·d] holding row r's keys/values [rows, heads, length, d] in the
    blocks of table[r], NaN elsewhere. "cpu": CPU_ATTN's, per block and head K as [d, block_size] then V as
    [block_size, d]; "gpu": TRITON_ATTN's, K then V per slot, stored block, slot, head (vLLM's LBNHC)."""
    heads, dim = keys.shape[1], keys.shape[3]
    if layout == "cpu":
        cache = torch.full((n_blocks, heads, 2, block_size * dim), float("nan"))
        k_half = cache[:, :, 0].view(n_blocks, heads, dim, block_size).transpose(-1, -2)
        v_half = cache[:, :, 1].view(n_blocks, heads, block_size, dim)
        cache = cache.view(n_blocks, heads, block_size, 2 * dim)
    else:
        cache = torch.full((n_blocks, block_size, heads, 2 * dim), float("nan")).transpose(1, 2)
        k_half, v_half = cache[..., :dim], cache[..., dim:]
    for r, length in enumerate(lengths):
        for s in range(length):
            block, slot = int(table[r, s // block_size]), s % block_size
            k_half[block, :, slot], v_half[block, :, slot] = keys[r, :, s], values[r, :, s]
    return cache


def _layout_views(layout: str, cache: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend's own views of its cache's keys and values, [blocks, heads, block_size, d]."""
    from selfextend.vllm.cpu_backend import SelfExtendCPUImpl
    from selfextend.vllm.gpu_backend import SelfExtendGPUImpl

    impl = SimpleNamespace(head_size=dim)
    cls = SelfExtendCPUImpl if layout == "cpu" else SelfExtendGPUImpl
    return cls.key_blocks(impl, cache), cls.value_blocks(impl, cache)


@pytest.mark.parametrize("layout", ["cpu", "gpu"])
def test_the_paged_cache_read_in_place_and_gathered(layout):
    """A request's keys and values gathered from vLLM's CPU or GPU cache layout come out in order; a step's rows
    read in place (two decoding, one a 3-token chunk), by the torch paged kernel and (CPU) by the native one,
    give what the blockwise kernel gives over those gathered keys, with the grouped keys kept (stored as the keys;
    on CPU also by the native writer) or not."""
    from selfextend.attention import KVLayout, resolve_backend, resolve_geometry
    from selfextend.rotary import GroupedRotation, rope_from_config
    from selfextend.vllm.layer import _step_rows, empty_like_blocks, gather_blocks, paged_attention, paged_groups
    from selfextend.attention.paged_native import native_paged_attention, native_step, write_grouped_keys
    from selfextend.vllm.cpu_backend import _halves

    n_blocks, heads, block_size, dim = 12, 2, 4, 32
    lengths, counts = [10, 17, 3], [1, 3, 1]
    table = torch.tensor([[3, 7, 1, 0, 0], [5, 2, 9, 11, 4], [6, 0, 0, 0, 0]], dtype=torch.int32)
    torch.manual_seed(0)
    keys, values = torch.randn(3, heads, 17, dim), torch.randn(3, heads, 17, dim)
    cache = _vllm_cache(layout, keys, values, table, lengths, n_blocks, block_size)
    key_blocks, value_blocks = _layout_views(layout, cache, dim)
    rope = rope_from_config(transformers.LlamaConfig(**SHAPE))
    rotation = GroupedRotation(2, 5, rope)
    grouped = empty_like_blocks(key_blocks).fill_(float("nan"))  # kept, stored as the keys
    assert sorted(range(4), key=grouped.stride) == sorted(range(4), key=key_blocks.stride)  # axes stored alike
    for r, length in enumerate(lengths):
        rotated = rotation(keys[r:r + 1], torch.arange(17)[None], "key")[0]
        for s in range(length):
            grouped[int(table[r, s // block_size]), :, s % block_size] = rotated[:, s]
    if layout == "cpu":  # the same, by the native writer (one step of three prefills)
        written = torch.full_like(grouped.transpose(-1, -2), float("nan"))
        slots = torch.cat([table[r, torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
                           for r, n in enumerate(lengths)])
        prefill = native_step(table, torch.tensor(lengths), torch.tensor([0, *lengths]).cumsum(0),
                              torch.tensor([0, 1, 2]), rotation, slots)
        assert write_grouped_keys(torch.cat([keys[r, :, :n].transpose(0, 1) for r, n in enumerate(lengths)]),
                                  prefill, written) == 30
        torch.testing.assert_close(written.transpose(-1, -2), grouped, rtol=0, atol=0, equal_nan=True)

    kernel, query = resolve_backend("blockwise", torch.device("cpu")), torch.randn(sum(counts), 4, dim)
    starts = [0, 1, 4, 5]
    expected = torch.empty_like(query)
    for r, (length, count) in enumerate(zip(lengths, counts)):
        got_keys = gather_blocks(key_blocks, table[r], length)
        got_values = gather_blocks(value_blocks, table[r], length)
        torch.testing.assert_close(got_keys, keys[r:r + 1, :, :length], rtol=0, atol=0)
        torch.testing.assert_close(got_values, values[r:r + 1, :, :length], rtol=0, atol=0)
        kept = gather_blocks(grouped, table[r], length)
        torch.testing.assert_close(kept, rotation(got_keys, torch.arange(length)[None], "key"), rtol=0, atol=0)
        geometry = resolve_geometry(KVLayout(q_offset=length - count, kv_offset=0), None, 1, count, length,
                                    query.device)
        rows = query[starts[r]:starts[r + 1]].transpose(0, 1)[None]
        expected[starts[r]:starts[r + 1]] = kernel.selfextend(rows, got_keys, got_values, geometry, rotation, 0.2)[0]

    metadata = SimpleNamespace(block_table=table, seq_lens=torch.tensor(lengths, dtype=torch.int32),
                               query_start_loc=torch.tensor(starts, dtype=torch.int32))
    found = _step_rows(metadata, [0, 1, 2], cache, rotation)
    assert _step_rows(metadata, [0, 1, 2], cache, rotation) is found  # built once per step, shared by the layers
    assert found.plan.total == 20  # the longest row, 17, in whole blocks
    assert found.tokens.tolist() == [[0, 0, 0], [1, 2, 3], [4, 4, 4]]  # the 3-token chunk; the others padded
    for kept in (grouped, None):
        out = paged_attention(query[found.tokens], key_blocks, value_blocks, found.plan, rotation, 0.2, kept)
        got = torch.empty_like(query)
        got[found.tokens[found.plan.real]] = out[found.plan.real]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # rows in groups within a memory budget (one call each), as many engine rows would be: the same outputs
        assert paged_groups([0, 1, 2], starts, lengths, 4, key_blocks) == [[0, 1, 2]]
        assert paged_groups([0, 1, 2], starts, lengths, 4, key_blocks, budget=1) == [[0], [1], [2]]
        per_key = 3 * heads * dim * 4 + 2 * 4 * 4 * 3  # keys, grouped keys, values; logits and probabilities x 3
        groups = paged_groups([0, 1, 2], starts, lengths, 4, key_blocks, budget=2 * 17 * per_key)
        assert groups == [[0, 1], [2]]
        grouped_out = torch.empty_like(query)
        for rows in groups:
            part = _step_rows(metadata, rows, cache, rotation)
            out = paged_attention(query[part.tokens], key_blocks, value_blocks, part.plan, rotation, 0.2, kept)
            grouped_out[part.tokens[part.plan.real]] = out[part.plan.real]
        torch.testing.assert_close(grouped_out, expected, atol=1e-5, rtol=1e-5)
        if layout == "cpu":
            native = torch.empty_like(query)
            step = native_step(table, metadata.seq_lens, metadata.query_start_loc, torch.tensor([0, 1, 2]), rotation)
            k_half, v_half = _halves(cache)
            native_paged_attention(query, native, k_half, v_half, step, 0.2,
                                   None if kept is None else kept.transpose(-1, -2))
            torch.testing.assert_close(native, expected, atol=1e-5, rtol=1e-5)


def test_each_new_token_at_its_absolute_position():
    """Three requests: a 4-token prefill chunk ending at 10, one decoding token at 6, a first chunk of 2."""
    from selfextend.vllm.layer import token_positions

    starts, lengths = torch.tensor([0, 4, 5, 7], dtype=torch.int32), torch.tensor([10, 7, 2], dtype=torch.int32)
    assert token_positions(starts, lengths).tolist() == [6, 7, 8, 9, 6, 0, 1]
