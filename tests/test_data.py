"""data.py: both datasets in every supported layout, gold cleanup, the paper's prompts, and clear errors.

All inputs are small .jsonl files written here; nothing touches the network (downloads are exercised against a fake
urlopen).
"""

import io
import json
import re
import sys
import urllib.error
from pathlib import Path

import pytest

import data

GSM8K_LINES = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A shop sells 1,080 pens a week. How many pens does it sell in 2 weeks?",
     "answer": "It sells 1,080*2 = <<1080*2=2160>>2,160 pens.\n#### 2,160"},
    {"question": "Betty has 5 dollars and spends 8. What is her balance?", "answer": "5-8=<<5-8=-3>>-3\n#### -3"},
]

ARC_HF = {
    "id": "Mercury_7175875",
    "question": "An astronomer observes that a planet rotates faster after a meteorite impact. "
                "Which is the most likely effect of this increase in rotation?",
    "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                         "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                "label": ["A", "B", "C", "D"]},
    "answerKey": "C",
}
ARC_AI2 = {  # the same question in the original AI2 release layout
    "id": ARC_HF["id"],
    "question": {"stem": ARC_HF["question"],
                 "choices": [{"text": t, "label": lab}
                             for t, lab in zip(ARC_HF["choices"]["text"], ARC_HF["choices"]["label"])]},
    "answerKey": "C",
}
ARC_NUMERIC = {"id": "NYSEDREGENTS_2015_4_8", "question": "Which is a liquid?",
               "choices": {"text": ["ice", "water", "steam"], "label": ["1", "2", "3"]}, "answerKey": "2"}


def write_jsonl(path, records, blank_lines=False):
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_gsm8k_gold_and_prompt(tmp_path):
    examples = data.load_dataset(str(write_jsonl(tmp_path / "test.jsonl", GSM8K_LINES)))
    first, second, third = examples
    assert first.id == "test-0" and third.id == "test-2"
    assert first.prompt_text == GSM8K_LINES[0]["question"] + " Let's think step by step."  # paper Fig. 5
    assert first.answer == "72" and first.answer_text == "The answer is 72."
    assert first.rationale == ("Natalia sold 48/2 = 24 clips in May.\n"
                               "Natalia sold 48+24 = 72 clips altogether in April and May.")
    assert second.answer == "2160" and second.answer_text == "The answer is 2160."  # separators removed
    assert second.rationale == "It sells 1,080*2 = 2,160 pens."
    assert third.answer == "-3"
    assert first.choices == [] and first.label == "" and first.task == "gsm8k"


ARC_PROMPT = (  # paper Fig. 6 / the official data_utils.py, with the options as a Python list
    "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely "
    "effect of this increase in rotation?\n"
    "Options: ['Planetary density will decrease.', 'Planetary years will become longer.', "
    "'Planetary days will become shorter.', 'Planetary gravity will become stronger.']\n"
    "Let's think step by step first then print your answer like 'The answer is (one of the options)'."
)


@pytest.mark.parametrize("record", [ARC_HF, ARC_AI2], ids=["hf_layout", "ai2_layout"])
def test_arc_both_layouts(tmp_path, record):
    (example,) = data.load_dataset(str(write_jsonl(tmp_path / "arc.jsonl", [record])))
    assert example.id == "Mercury_7175875" and example.task == "arc_challenge"
    assert example.prompt_text == ARC_PROMPT
    assert example.answer == "Planetary days will become shorter." and example.label == "C"
    assert example.answer_text == "The answer is Planetary days will become shorter.."  # as the official code
    assert example.choices[0] == ("A", "Planetary density will decrease.") and len(example.choices) == 4
    assert example.rationale == ""


def test_arc_numeric_labels_and_three_options(tmp_path):
    (example,) = data.load_dataset(str(write_jsonl(tmp_path / "arc.jsonl", [ARC_NUMERIC])))
    assert example.label == "2" and example.answer == "water"
    assert "Options: ['ice', 'water', 'steam']\n" in example.prompt_text


def test_directory_limit_and_blank_lines(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM8K_LINES, blank_lines=True)
    assert len(data.load_dataset(str(tmp_path), split="train")) == 3
    assert [e.id for e in data.load_dataset(str(tmp_path), split="train", limit=2)] == ["train-0", "train-1"]
    with pytest.raises(ValueError, match="limit must be a positive"):
        data.load_dataset(str(tmp_path), split="train", limit=0)


def test_named_dataset_from_latro_data_dir(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "arc_challenge").mkdir()
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM8K_LINES)
    write_jsonl(tmp_path / "arc_challenge" / "validation.jsonl", [ARC_HF, ARC_NUMERIC])
    monkeypatch.setenv("LATRO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LATRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data.urllib.request, "urlopen", refuse_network)
    assert [e.answer for e in data.load_dataset("gsm8k", "test")] == ["72", "2160", "-3"]
    assert [e.label for e in data.load_dataset("arc_challenge", "validation")] == ["C", "2"]


# ---------------------------------------------------------------------------------------------------------------------
# Errors name the file, the line and what was expected


@pytest.mark.parametrize("bad_line, message", [
    ('{"question": "How many?", "answer": "42"', "not valid JSON"),
    ('["a", "list"]', "expected a JSON object"),
    ('{"question": "How many?", "answer": "The total is 42."}', "exactly one '#### '"),
    ('{"question": "How many?", "answer": "####  \\n#### 4"}', "exactly one '#### '"),
    ('{"question": 7, "answer": "#### 4"}', "expected string fields 'question'"),
    ('{"id": "x", "question": "Which?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}',
     "expected a gsm8k record"),
])
def test_malformed_gsm8k_line_names_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", GSM8K_LINES[:2] + [bad_line])
    with pytest.raises(ValueError, match=message) as error:
        data.load_dataset(str(path))
    assert str(error.value).startswith(f"{path}:3: ")


@pytest.mark.parametrize("bad_record, message", [
    ({**ARC_HF, "answerKey": "E"}, "expected 'answerKey' to be one of the choice labels"),
    ({**ARC_HF, "choices": ["a", "b"]}, "expected 'choices' to be an object"),
    ({**ARC_HF, "choices": {"text": ["a", "b"], "label": ["A"]}}, "as many labels as texts"),
    ({**ARC_AI2, "question": {"stem": "Which?", "choices": "A or B"}}, "a list of"),
])
def test_malformed_arc_line_names_file_and_line(tmp_path, bad_record, message):
    layout_twin = ARC_HF if "stem" not in str(bad_record["question"]) else ARC_AI2
    path = write_jsonl(tmp_path / "bad.jsonl", [layout_twin, bad_record])
    with pytest.raises(ValueError, match=message) as error:
        data.load_dataset(str(path))
    assert str(error.value).startswith(f"{path}:2: ")


def test_unrecognised_records_say_what_was_expected(tmp_path):
    path = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "hi", "completion": "there"}])
    with pytest.raises(ValueError) as error:
        data.load_dataset(str(path))
    message = str(error.value)
    assert message.startswith(f"{path}:1: unrecognised record with fields ['completion', 'prompt']")
    assert '"answer": str ending in "#### <number>"' in message and '"answerKey"' in message


def test_unknown_dataset_split_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'gsm9k': expected one of gsm8k, arc_challenge"):
        data.load_dataset("gsm9k")
    with pytest.raises(ValueError, match=r"gsm8k has no split 'dev': expected one of train, validation, test"):
        data.load_dataset("gsm8k", "dev")
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        data.load_dataset(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        data.load_dataset(str(empty))


# ---------------------------------------------------------------------------------------------------------------------
# Downloads, against a fake network


def refuse_network(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


def test_offline_download_fails_with_a_way_out(tmp_path, monkeypatch):
    monkeypatch.delenv("LATRO_DATA_DIR", raising=False)
    monkeypatch.setenv("LATRO_CACHE", str(tmp_path))
    monkeypatch.setattr(data.urllib.request, "urlopen", refuse_network)
    with pytest.raises(FileNotFoundError, match=r"gsm8k test: download failed .*LATRO_DATA_DIR/gsm8k/test.jsonl"):
        data.load_dataset("gsm8k", "test")
    assert not (tmp_path / "data" / "gsm8k" / "test.jsonl").exists()


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_arc_download_pages_through_the_rows_api(tmp_path, monkeypatch):
    monkeypatch.delenv("LATRO_DATA_DIR", raising=False)
    monkeypatch.setenv("LATRO_CACHE", str(tmp_path))
    monkeypatch.setitem(data.ARC_SIZES, "validation", 3)
    rows = [{**ARC_HF, "id": f"q{i}"} for i in range(3)]
    offsets = []

    def urlopen(url, timeout):
        offset = int(url.split("offset=")[1].split("&")[0])
        offsets.append(offset)
        page = [{"row_idx": i, "row": r, "truncated_cells": []} for i, r in enumerate(rows[offset:offset + 2])]
        return FakeResponse(json.dumps({"rows": page, "num_rows_total": 3}).encode())

    monkeypatch.setattr(data, "ARC_PAGE", 2)
    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    examples = data.load_dataset("arc_challenge", "validation")
    assert [e.id for e in examples] == ["q0", "q1", "q2"] and offsets == [0, 2]
    assert (tmp_path / "data" / "arc_challenge" / "validation.jsonl").is_file()
    monkeypatch.setattr(data.urllib.request, "urlopen", refuse_network)  # cached now: no second download
    assert len(data.load_dataset("arc_challenge", "validation")) == 3


def test_gsm8k_download_is_checked_against_its_hash(tmp_path, monkeypatch):
    monkeypatch.delenv("LATRO_DATA_DIR", raising=False)
    monkeypatch.setenv("LATRO_CACHE", str(tmp_path))
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: FakeResponse(b'{"tampered": 1}\n'))
    with pytest.raises(ValueError, match="does not match the pinned sha256"):
        data.load_dataset("gsm8k", "train")
    assert not (tmp_path / "data" / "gsm8k" / "train.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Chat prompts


def test_chat_prompt_chatml(tiny_llama_dir, tmp_path):
    from model import Tokenizer

    tokenizer = Tokenizer(tiny_llama_dir)
    (example,) = data.load_dataset(str(write_jsonl(tmp_path / "arc.jsonl", [ARC_HF])))
    text = data.chat_prompt_text(tokenizer, example)
    assert text.endswith(f"<|im_start|>user\n{ARC_PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(data.chat_prompt(tokenizer, example)) == text


def test_chat_prompt_llama3_has_one_bos(tiny_llama3_dir, tmp_path):
    from model import Tokenizer

    tokenizer = Tokenizer(tiny_llama3_dir)
    example = data.load_dataset(str(write_jsonl(tmp_path / "g.jsonl", GSM8K_LINES)))[0]
    ids = data.chat_prompt(tokenizer, example)
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
    text = tokenizer.decode(ids)
    assert f"<|start_header_id|>user<|end_header_id|>\n\n{example.prompt_text}<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_prompt_without_chat_template_is_the_official_fallback(tiny_llama_dir, tmp_path):
    from model import Tokenizer

    tokenizer = Tokenizer(tiny_llama_dir)
    tokenizer.chat_template = None  # a base model
    gsm, = data.load_dataset(str(write_jsonl(tmp_path / "g.jsonl", GSM8K_LINES[:1])))
    arc, = data.load_dataset(str(write_jsonl(tmp_path / "a.jsonl", [ARC_NUMERIC])))
    assert data.chat_prompt_text(tokenizer, gsm) == GSM8K_LINES[0]["question"] + "\nLet's think step by step."
    assert data.chat_prompt_text(tokenizer, arc) == (
        "Question: Which is a liquid?\nOptions: ['ice', 'water', 'steam']\nAnswer: Let's think step by step.")


def test_arith_is_deterministic_disjoint_and_self_consistent():
    train, test, val = (data.load_dataset("arith", s) for s in ("train", "test", "validation"))
    assert (len(train), len(test), len(val)) == tuple(data.ARITH_SIZES[s] for s in ("train", "test", "validation"))
    assert [e.question for e in data.arith_examples("train")] == [e.question for e in train]  # same seed, same data
    questions = [{e.question for e in split} for split in (train, test, val)]
    assert not questions[0] & questions[1] and not questions[0] & questions[2] and not questions[1] & questions[2]
    assert data.load_dataset("arith", "test", limit=5) == test[:5]
    for e in train + test + val:
        # the gold rationale's steps, re-computed by Python, end at the gold answer and follow the question's verbs
        start = int(e.rationale.split(" starts with ")[1].split(".")[0])
        steps = e.rationale.split(". ")[1:]
        verbs = [w for w in ("buys", "gives away", "doubles", "triples") for _ in range(e.question.count(w))]
        assert 1 <= len(steps) <= 3 and len(verbs) == len(steps)
        value = start
        for step in steps:
            lhs, rhs = step.rstrip(".").split(" = ")
            a, op, b = lhs.split()
            assert int(a) == value  # each step starts from the previous result
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
            assert value == int(rhs) and value >= 0
        assert str(value) == e.answer and e.answer_text == f"The answer is {value}."


def test_transfer_set_is_self_consistent_and_worded_unlike_arith():
    """tools/transfer.py: every worked step re-computes, the last gives the gold, and no question shares arith's
    verbs, question phrasing or any question text."""
    import re
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from transfer import transfer_records
    records, one_step = transfer_records(), transfer_records(one_step=True)
    assert records == transfer_records() and len({r["question"] for r in records}) == 200
    assert len({r["question"] for r in one_step}) == 200 and all(r["answer"].count("=") == 1 for r in one_step)
    arith = {e.question for s in ("train", "validation", "test") for e in data.load_dataset("arith", s)}
    for r in records + one_step:
        steps, gold = r["answer"].split(" #### ")
        value = None
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", steps):
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) / int(b)}[op]
            assert value == int(c)
        assert value == int(gold) >= 0
        assert not any(w in r["question"] for w in ("buys", "gives away", "doubles", "triples", "have now"))
        assert r["question"] not in arith


def test_gsm8k_validation_is_carved_from_train_by_a_fixed_seed(tmp_path, monkeypatch):
    rows = [{"question": f"Question {i}?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(600)]
    (tmp_path / "gsm8k").mkdir()
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", rows)
    monkeypatch.setenv("LATRO_DATA_DIR", str(tmp_path))
    train, val = data.load_dataset("gsm8k", "train"), data.load_dataset("gsm8k", "validation")
    assert (len(train), len(val)) == (600 - data.GSM8K_VALIDATION, data.GSM8K_VALIDATION)
    assert not {e.question for e in train} & {e.question for e in val}
    assert {e.id for e in train} | {e.id for e in val} == {f"train-{i}" for i in range(600)}  # ids of the file
    assert data.load_dataset("gsm8k", "validation") == val and data.load_dataset("gsm8k", "train", limit=3) == train[:3]


@pytest.mark.parametrize("gold", ["$12", "five", "3/4", "12 apples"])
def test_a_non_numeric_gsm8k_gold_is_refused_at_load_naming_the_line(tmp_path, gold):
    path = write_jsonl(tmp_path / "g.jsonl", GSM8K_LINES[:2] + [{"question": "Q?", "answer": f"so\n#### {gold}"}])
    with pytest.raises(ValueError, match=rf"g.jsonl:3: expected a number after '#### ', got '{re.escape(gold)}'"):
        data.load_dataset(str(path))


def test_a_non_utf8_byte_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GSM8K_LINES[0]).encode() + b"\n" + '{"question": "Caf\xe9?", "answer": "1\\n#### 1"}'
                     .encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 18\)"):
        data.load_dataset(str(path))


@pytest.mark.parametrize("records,message", [
    ([{"question": "  ", "answer": "1\n#### 1"}], "expected string fields 'question' (not empty)"),
    ([{"id": "a", "question": "Q1?", "answer": "#### 1"}, {"id": "a", "question": "Q2?", "answer": "#### 2"}],
     "id 'a' again (first on line 1)"),
    ([{"id": "q", "question": "Pick", "choices": {"text": ["x", "y"], "label": ["A", "A"]}, "answerKey": "A"}],
     "expected distinct choice labels"),
])
def test_questions_that_would_train_or_score_the_wrong_thing_are_refused(tmp_path, records, message):
    path = write_jsonl(tmp_path / "odd.jsonl", records)
    with pytest.raises(ValueError, match=re.escape(message)):
        data.load_dataset(str(path))
