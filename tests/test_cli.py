"""Command line on a tiny seeded model saved to a temp folder, with a byte-level tokenizer trained here."""

import io
import json

import pytest
import torch
import transformers

from selfextend import cli
from selfextend.samples import passkey_sample
from conftest import TRAIN_LENGTH


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_from_file_streams_and_reports(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The grass is green. " * 20)
    code, out, err = run(capsys, "generate", "--input", doc, "--prompt", "What?", "--model", model_dir,
                         "--max-new-tokens", 5, "--chunk-size", 16, "--quiet")
    assert code == 0, err
    assert "G=" in err and "W=" in err and "prefill" in err
    assert out.strip()  # the streamed answer


def test_generate_matches_plain_generate(model_dir, tmp_path, capsys):
    """Chunked prefill + generate through the CLI gives the tokens of one generate call."""
    text = "The sky is blue. " * 15
    (tmp_path / "doc.txt").write_text(text)
    code, out, err = run(capsys, "generate", "--input", tmp_path / "doc.txt", "--model", model_dir,
                         "--group-size", 4, "--window", 8, "--max-new-tokens", 6, "--chunk-size", 7, "--weights",
                         "dense", "--kv-cache-dtype", "model", "--quiet")
    assert code == 0, err
    import selfextend

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = selfextend.apply(transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval(), 4, 8)
    ids = tokenizer(text.strip(), return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.strip() == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("weights", ["float16", "int8"])
def test_generate_with_lighter_weights(model_dir, tmp_path, capsys, monkeypatch, weights):
    """--weights stores the linear layers lighter and still answers (float16 as the plain model, greedy)."""
    from selfextend import models
    from selfextend.weights import PackedLinear

    text = "The sky is blue. " * 15
    (tmp_path / "doc.txt").write_text(text)
    argv = ["generate", "--input", tmp_path / "doc.txt", "--model", model_dir, "--max-new-tokens", 6, "--quiet"]
    code, dense, err = run(capsys, *argv, "--weights", "dense")
    assert code == 0, err
    loaded, load = [], models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    code, out, err = run(capsys, *argv, "--weights", weights)
    assert code == 0, err
    packed = [m for m in loaded[0].modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.format == weights for m in packed)  # the flag reached the model
    if weights == "float16":
        assert out == dense


@pytest.mark.parametrize("flags, stored", [((), torch.float16), (("--kv-cache-dtype", "float16"), torch.float16),
                                           (("--kv-cache-dtype", "model"), torch.float32)])
def test_generate_with_a_float16_kv_cache(model_dir, tmp_path, capsys, monkeypatch, flags, stored):
    """The KV cache the answer is read from is float16 by default on CPU (and when asked), the model's dtype
    when asked; the run answers either way."""
    from selfextend import inference

    (tmp_path / "doc.txt").write_text("The sky is blue. " * 15)
    caches, prefill = [], inference.prefill
    monkeypatch.setattr(inference, "prefill", lambda *a, **k: caches.append(prefill(*a, **k)) or caches[-1])
    code, out, err = run(capsys, "generate", "--input", tmp_path / "doc.txt", "--model", model_dir,
                         "--max-new-tokens", 6, *flags, "--quiet")
    assert code == 0, err
    assert out.strip()
    assert {layer.keys.dtype for layer in caches[0].layers} == {stored}


def test_serve_hands_its_engine_the_kv_cache_dtype(model_dir, monkeypatch):
    """serve's engine stores float16 by default on CPU, the model's dtype when asked; eval measures the model's
    unless asked."""
    pytest.importorskip("fastapi")
    from selfextend.serving import server

    engines = []
    monkeypatch.setattr(server, "serve", lambda engine, *args: engines.append(engine))
    for flags in ((), ("--kv-cache-dtype", "model")):
        assert cli.main(["serve", "--model", str(model_dir), *flags]) == 0
    assert [engine.cache_dtype for engine in engines] == [torch.float16, None]
    assert cli.build_parser().parse_args(["eval", "passkey", "--lengths", "1k", "--out", "x"]).kv_cache_dtype == "model"


def test_generate_reads_stdin(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("The grass is green. " * 10))
    code, out, err = run(capsys, "generate", "--input", "-", "--model", model_dir, "--max-new-tokens", 3, "--quiet")
    assert code == 0, err


def test_generate_sample_document(model_dir, capsys):
    code, out, err = run(capsys, "generate", "--sample-tokens", 180, "--model", model_dir, "--max-new-tokens", 3,
                         "--quiet")
    assert code == 0, err
    assert "the key is" in err


@pytest.mark.parametrize("argv, message", [
    (["generate", "--input", "/nonexistent/file.txt"], "input file not found"),
    (["generate"], "give --input"),
    (["generate", "--input", "{empty}"], "is empty"),
    (["generate", "--input", "{doc}", "--group-size", "4"], "both --group-size and --window"),
    (["generate", "--input", "{doc}", "--group-size", "4", "--window", "64"], "smaller than the model's training"),
    (["generate", "--input", "{long}"], "need a group size above 64"),
    (["plan", "--model", "no-such/model-anywhere", "--length", "100"], "unknown model"),
    (["plan", "--model", "/no/such/model.gguf", "--length", "100"], "no such GGUF file"),
    (["plan"], "--length N or --input"),
    (["generate", "--input", "{doc}", "--method", "string", "--effective-length", "50", "--model",
      "/no/such/model.gguf"], "STRING does not use it"),  # flags are checked before any model is looked for
    (["generate", "--input", "{doc}", "--weights", "int8", "--dtype", "bfloat16"], "float32 compute on CPU"),
    (["generate", "--input", "{doc}", "--kv-cache-dtype", "float16", "--dtype", "bfloat16"], "for float32 models"),
    (["eval", "passkey", "--lengths", "100", "--out", "{doc}.out", "--kv-cache-dtype", "float16"],
     "vanilla run the model's own"),
])
def test_clear_errors(model_dir, tmp_path, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "doc.txt").write_text("The grass is green. " * 10)
    (tmp_path / "long.txt").write_text("The grass is green. " * 1500)
    argv = [a.format(empty=tmp_path / "empty.txt", doc=tmp_path / "doc.txt", long=tmp_path / "long.txt")
            for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(model_dir)]
    code, out, err = run(capsys, *argv, *(["--quiet"] if argv[0] == "generate" else []))
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_model_without_rope_is_a_clear_error(tmp_path, capsys, model_dir):
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=303,
                                                         n_positions=64)).save_pretrained(gpt2)
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(gpt2)
    (tmp_path / "doc.txt").write_text("The grass is green. " * 10)
    code, out, err = run(capsys, "generate", "--input", tmp_path / "doc.txt", "--model", gpt2, "--quiet",
                         "--group-size", 2, "--window", 8)
    assert code == 2 and "no rotary position embedding" in err


def test_plan_table_and_json(model_dir, capsys):
    code, out, err = run(capsys, "plan", "--model", model_dir, "--length", 200)
    assert code == 0 and "group size G" in out and "why:" in out
    code, out, err = run(capsys, "plan", "--model", model_dir, "--length", 200, "--json")
    data = json.loads(out)
    assert data["train_length"] == TRAIN_LENGTH and data["max_length"] >= 200


def test_plan_measures_an_input(model_dir, tmp_path, capsys):
    (tmp_path / "doc.txt").write_text("The grass is green. " * 30)
    code, out, err = run(capsys, "plan", "--model", model_dir, "--input", tmp_path / "doc.txt", "--json")
    assert code == 0 and json.loads(out)["target_length"] > TRAIN_LENGTH


def test_info(model_dir, capsys):
    code, out, err = run(capsys, "info", "--model", model_dir, "--json")
    info = json.loads(out)
    assert info["family"] == "llama" and info["extended_layers"] == [0, 1] and info["training_length"] == 64


def test_passkey_sample_is_deterministic_and_sized():
    count = lambda text: len(text.split())  # noqa: E731
    a, b = passkey_sample(count, 500, depth=0.25, seed=3), passkey_sample(count, 500, depth=0.25, seed=3)
    assert a == b and a.answer in a.text and abs(count(a.text + a.question) - 500) < 40
    assert a.text.index(a.answer) < len(a.text) // 2


@pytest.mark.slow
def test_embedded_default_past_its_training_length(capsys):
    """The real Gemma 3 270M on a generated passkey document past 32K tokens (minutes on CPU)."""
    code, out, err = run(capsys, "generate", "--sample-tokens", 34000, "--max-new-tokens", 8, "--quiet")
    assert code == 0, err
    assert "G=" in err and out.strip()


def test_ctrl_c_stops_cleanly(model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "doc.txt").write_text("The grass is green. " * 10)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("selfextend.models.load_model", interrupted)
    code, out, err = run(capsys, "generate", "--input", tmp_path / "doc.txt", "--model", model_dir, "--quiet")
    assert code == 130 and "interrupted" in err and "Traceback" not in err


def test_int8_weights_without_a_c_compiler_say_so(model_dir, tmp_path, capsys, no_c_compiler):
    (tmp_path / "doc.txt").write_text("The grass is green. " * 10)
    code, out, err = run(capsys, "generate", "--input", str(tmp_path / "doc.txt"), "--model", str(model_dir),
                         "--weights", "int8", "--quiet")
    assert code == 2
    assert "no C compiler ('/no/such/cc') to build linear_native.c" in err and "Traceback" not in err


def test_generate_stores_weights_as_int8_by_default_on_cpu(model_dir, tmp_path, capsys, monkeypatch):
    """`auto`, the default of generate and serve: int8 on CPU with float32 compute; eval and calibrate measure the
    model as loaded (dense) unless asked."""
    from selfextend import models
    from selfextend.weights import choose_format

    assert choose_format("auto") == ("int8", None)
    assert choose_format("auto", dtype="bfloat16") == ("dense", None)
    assert choose_format("auto", device="cuda") == ("dense", None)
    (tmp_path / "doc.txt").write_text("The sky is blue. " * 15)
    loaded, load = [], models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(k["weights"]) or load(*a, **k))
    code, out, err = run(capsys, "generate", "--input", tmp_path / "doc.txt", "--model", model_dir,
                         "--max-new-tokens", 3, "--quiet")
    assert code == 0, err
    assert loaded == ["int8"] and "selfextend:" not in err
    parser = cli.build_parser()
    assert parser.parse_args(["serve"]).weights == "auto"
    assert parser.parse_args(["eval", "passkey", "--lengths", "1k", "--out", "x"]).weights == "dense"
    assert parser.parse_args(["calibrate"]).weights == "dense"


def test_default_weights_without_a_c_compiler_are_dense_and_say_so(model_dir, tmp_path, capsys, monkeypatch,
                                                                  no_c_compiler):
    from selfextend import models

    (tmp_path / "doc.txt").write_text("The grass is green. " * 10)
    loaded, load = [], models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(k["weights"]) or load(*a, **k))
    with pytest.warns(UserWarning, match="decode attention runs on torch's kernels"):
        code, out, err = run(capsys, "generate", "--input", str(tmp_path / "doc.txt"), "--model", str(model_dir),
                             "--max-new-tokens", 3, "--quiet")
    assert code == 0, err
    assert loaded == ["dense"]
    notices = [line for line in err.splitlines() if line.startswith("selfextend: loading dense")]
    assert len(notices) == 1 and "no C compiler ('/no/such/cc')" in notices[0] and "--weights dense" in notices[0]


def test_commands_run_with_large_allocations_mapped(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "map_large_allocations", lambda: calls.append(True))
    assert cli.main(["generate"]) == cli.EXIT_USAGE  # refused before it loads anything
    assert calls == [True] and "give --input" in capsys.readouterr().err
