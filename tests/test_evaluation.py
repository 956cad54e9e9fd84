"""The evaluation harness: tasks, scoring, perplexity, the resumable runner, summaries, plots, `selfextend eval`."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
import transformers

import selfextend
from selfextend import cli
from selfextend.evaluation import (PERPLEXITY, TASKS, Evaluation, Method, evaluate, format_table, is_correct,
                                   load_rows, nll_by_position, plot, summarize, write_csv)
from selfextend.evaluation.perplexity import bucket_means, token_nll
from conftest import make_model


def count_words(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_are_deterministic_sized_and_hold_their_answers(task):
    make = TASKS[task]
    sample = make(count_words, 2000, 0.3, seed=1)
    assert sample == make(count_words, 2000, 0.3, seed=1)
    assert make(count_words, 2000, 0.3, seed=2).expected != sample.expected
    assert 1800 <= count_words(sample.prompt) <= 2010
    assert all(item in sample.context for item in sample.expected)
    assert sample.prompt.endswith(sample.question)


@pytest.mark.parametrize("digits", [5, 10])
def test_passkey_digits(digits):
    sample = TASKS["passkey"](count_words, 500, 0.5, seed=4, digits=digits)
    assert len(sample.expected[0]) == digits and sample.expected[0].isdigit()
    assert sample.max_new_tokens >= digits


@pytest.mark.parametrize("task", ["passkey", "niah", "multikey", "kv"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_asked_needle_sits_at_its_depth(task, depth):
    sample = TASKS[task](count_words, 3000, depth, seed=3)
    where = sample.context.index(sample.expected[0]) / len(sample.context)
    assert abs(where - depth) < 0.06


def test_scoring_is_exact_match_of_every_expected_string():
    assert is_correct(("60494",), " 60494. Remember it.")
    assert is_correct(("60494",), "6 0 4 9 4")  # digits spaced out by a word-level tokenizer
    assert not is_correct(("60494",), "60495")
    assert not is_correct(("1111111", "2222222"), "1111111 and 3333333")
    assert is_correct(("ABCDE", "FGHIJ"), "VAR FGHIJ, VAR ABCDE")


def test_chunked_nll_equals_one_forward():
    model = make_model("llama")
    ids = torch.randint(3, 97, (1, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(token_nll(model, ids, chunk_size=37), whole, atol=1e-5, rtol=1e-5)
    selfextend.apply(model, 4, 8)
    with torch.no_grad():
        extended = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(token_nll(model, ids, chunk_size=37), extended, atol=1e-5, rtol=1e-5)


def test_bucket_means():
    assert bucket_means(torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0]), 2) == [2.0, 6.0, 9.0]


def _load(model_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer


def test_evaluate_writes_one_row_per_result_and_resumes(model_dir, tmp_path):
    model, tokenizer = _load(model_dir)
    ev = Evaluation("passkey", [40, 150], [Method.parse("vanilla"), Method.parse("selfextend")], "tiny",
                    depths=[0.0, 1.0], samples=2, chunk_size=32)
    rows = evaluate(model, tokenizer, ev, tmp_path, progress=False)
    assert len(rows) == 2 * 2 * 2 * 2
    fields = {"task", "model", "method", "params", "length", "tokens", "depth", "seed", "expected", "got",
              "correct", "seconds"}
    assert all(fields <= set(row) for row in rows)
    assert {row["method"] for row in rows} == {"vanilla", "selfextend"}
    assert all(row["params"]["G"] > 1 for row in rows if row["method"] == "selfextend" and row["length"] == 150)
    # Both methods saw the very same prompt
    assert len({(row["tokens"], row["expected"][0]) for row in rows if row["length"] == 150 and row["seed"] == 0
                and row["depth"] == 0.0}) == 1

    path = tmp_path / "results.jsonl"
    assert len(evaluate(model, tokenizer, ev, tmp_path, progress=False)) == 16  # nothing left to run
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:25])  # interrupted mid-line
    assert len(load_rows(tmp_path)) == 13
    again = evaluate(model, tokenizer, ev, tmp_path, progress=False)
    assert len(again) == 16
    strip = lambda row: {k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
    assert sorted(map(json.dumps, map(strip, again))) == sorted(map(json.dumps, map(strip, rows)))


def test_perplexity_rows_and_report(model_dir, tmp_path):
    model, tokenizer = _load(model_dir)
    ev = Evaluation(PERPLEXITY, [100, 200], [Method.parse("vanilla"), Method.parse("linear")], "tiny", bucket=25)
    rows = evaluate(model, tokenizer, ev, tmp_path, progress=False)
    assert len(rows) == 4
    longest = next(r for r in rows if r["length"] == 200 and r["method"] == "linear")
    assert longest["params"] == {"factor": 200 / 64} and len(longest["nll_buckets"]) == 8
    assert math.isclose(longest["ppl"], math.exp(longest["nll"]), rel_tol=1e-3)
    summary = summarize(rows)
    write_csv(summary, tmp_path / "summary.csv")
    assert (tmp_path / "summary.csv").read_text().count("\n") == 5
    assert "perplexity" in format_table(summary)
    bands = nll_by_position(rows, per_band=4)
    assert "perplexity at 200 tokens" in bands and "100-200" in bands and bands.count("linear") == 2
    pictures = plot(rows, tmp_path)
    assert [p.name for p in pictures] == ["perplexity_by_position.png"]
    assert pictures[0].read_bytes()[:4] == b"\x89PNG"


def test_nll_by_position_weights_each_bucket_by_its_tokens():
    row = {"task": PERPLEXITY, "method": "vanilla", "length": 11, "tokens": 11, "bucket": 3,
           "nll_buckets": [1.0, 2.0, 3.0, 10.0]}  # 10 predicted tokens: buckets of 3, 3, 3 and 1
    lines = nll_by_position([row], per_band=2).splitlines()
    assert lines[0] == "perplexity at 11 tokens: mean NLL (nats) by position"
    assert lines[1].split() == ["method", "0-6", "6-11"]
    assert lines[2].split() == ["vanilla", "1.5000", f"{(3 * 3.0 + 10.0) / 4:.4f}"]


def test_report_accuracy_and_heatmap(tmp_path):
    rows = [{"task": "passkey", "model": "m", "method": method, "params": {}, "length": length, "depth": depth,
             "seed": 0, "correct": method == "selfextend" or length == 100, "seconds": 1.0}
            for method in ("vanilla", "selfextend") for length in (100, 400) for depth in (0.0, 1.0)]
    summary = summarize(rows)
    by = {(s["method"], s["length"]): s["accuracy"] for s in summary}
    assert by == {("vanilla", 100): 1.0, ("vanilla", 400): 0.0, ("selfextend", 100): 1.0, ("selfextend", 400): 1.0}
    assert [s["method"] for s in summary][:2] == ["vanilla", "vanilla"]  # in the order they ran
    names = sorted(p.name for p in plot(rows, tmp_path))
    assert names == ["passkey_accuracy.png", "passkey_heatmap.png"]


@pytest.mark.parametrize("kwargs, match", [
    ({"task": "nope"}, "unknown task"), ({"lengths": []}, "lengths"), ({"samples": 0}, "samples"),
    ({"depths": [1.5]}, "depths"), ({"methods": []}, "method"),
])
def test_bad_evaluations_are_refused(kwargs, match):
    base = dict(task="passkey", lengths=[100], methods=[Method.parse("vanilla")], model_name="m")
    with pytest.raises(ValueError, match=match):
        Evaluation(**{**base, **kwargs})


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_eval_writes_results_summary_and_plots(model_dir, tmp_path, capsys):
    code, out, err = run(capsys, "eval", "multikey", "--model", model_dir, "--lengths", "60,0.25k",
                         "--methods", "vanilla,selfextend:G=4,W=8,yarn", "--depths", "0,1", "--out", tmp_path,
                         "--quiet")
    assert code == 0, err
    assert "multikey (accuracy" in out and "selfextend:G=4,W=8" in out and "yarn" in out
    for name in ["results.jsonl", "summary.csv", "multikey_accuracy.png", "multikey_heatmap.png"]:
        assert (tmp_path / name).exists()
    assert len(load_rows(tmp_path)) == 2 * 2 * 3
    assert {r["length"] for r in load_rows(tmp_path)} == {60, 256}


@pytest.mark.parametrize("argv, match", [
    (["eval", "passkey", "--lengths", "4x"], "bad --lengths"),
    (["eval", "passkey", "--lengths", "100", "--methods", "rope"], "unknown method"),
    (["eval", "riddles", "--lengths", "100"], "unknown task"),
    (["eval", "passkey", "--lengths", "100", "--depths", "half"], "bad --depths"),
    (["eval", "passkey", "--lengths", "100000000", "--methods", "selfextend"], "group size above"),
])
def test_cli_eval_errors(model_dir, tmp_path, capsys, argv, match):
    code, _, err = run(capsys, *argv, "--model", model_dir, "--out", tmp_path)
    assert code == 2 and match in err
