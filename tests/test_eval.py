"""eval.py: answer extraction on realistic outputs, scores, and the CLI end to end on a tiny random model.

Tiny random models write gibberish, so their accuracy is ~0; the end-to-end tests check plumbing (files, resume,
settings checks, the distributed gather), and `evaluate` is also run with a scripted generate() to check scoring.
"""

import errno
import json
import os
import sys
from pathlib import Path

import pytest

import data
import eval as ev
from conftest import run_command

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------------
# GSM8K extraction

GSM8K_CASES = [
    # (model output, extracted answer)
    ("Janet sells 16 - 3 - 4 = 9 duck eggs a day. She makes 9 * 2 = $18 every day. The answer is 18.", "18"),
    ("She earns 12 * 90 = 1,080 dollars. The answer is $1,080.", "1080"),
    ("The total is 1080.00 dollars.\nThe answer is 1,080.00", "1080"),
    ("The temperature falls by 8 degrees, so 5 - 8 = -3.\nThe answer is: -3 degrees", "-3"),
    ("She has 5-3 = 2 apples left", "2"),  # no marker: the last number; "-3" in "5-3" is not a sign
    ("The answer is 18. Let me double-check: 9 * 2 = 18, and 20 - 2 = 18, so 20 was wrong.", "18"),
    ("The answer is 10. Wait, I forgot the tax. 10 + 2 = 12. The answer is 12.", "12"),  # the LAST marker
    ("First 3 + 4 = 7, so the answer is 7 cookies. Check: 7 + 1 = 8.", "7"),  # any case
    ("Therefore, The answer is **42**.", "42"),
    ("Adding them gives $\\boxed{72}$", "72"),
    ("She pays 0.5 * 8 = 4 dollars. So 4.", "4"),  # trailing period
    ("Each gets .5 of the pie", "0.5"),
    ("The answer is 3.50 dollars per pound.", "3.5"),
    ("I am not sure how to solve this.", None),
    ("The answer is twelve, since 3 * 4 = 12", "3"),  # the first number after the marker, as the official code
    ("The city has 1,234,567 people.", "1234567"),
    ("We add the items 1,2,3", "3"),  # "1,2,3" is a list, not one thousand-separated number
    ("It is \u22125 degrees outside.", "-5"),  # typographic minus
    ("The answer is 10%.", "10"),
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("It costs $12.50 per hour; for 2 hours that is $25.", "25"),
    ("The answer is -0.25", "-0.25"),
    ("The temperature went from 5 to -2", "-2"),
    ("The answer is 18.\n\nThe answer is 18.", "18"),
    ("Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 72.\n\nThe answer is: 72", "72"),
]


@pytest.mark.parametrize("text, expected", GSM8K_CASES)
def test_extract_number(text, expected):
    assert ev.extract_number(text) == expected


def gsm8k(answer):
    return data.gsm8k_example("q", "How many?", f"Work.\n#### {answer}")


def test_gsm8k_correct_is_numeric():
    assert ev.is_correct(gsm8k("1,080"), "1080")
    assert ev.is_correct(gsm8k("18"), ev.extract_number("The answer is 18.00"))
    assert ev.is_correct(gsm8k("-3"), "-3")
    assert not ev.is_correct(gsm8k("18"), "18.5")
    assert not ev.is_correct(gsm8k("18"), None)


# The official rule (case-sensitive "The answer is", regex -?[\d,]*\.?\d+) next to ours: where they agree and differ.
OFFICIAL_GSM8K_CASES = [
    # (output, gold, official verdict, our verdict)
    ("9 * 2 = 18. The answer is 18.", "18", True, True),
    ("The answer is $1,080.", "1,080", True, True),
    ("So the answer is 7. Check: 7 + 1 = 8.", "7", False, True),  # official: no exact-case marker -> last number 8
    ("We add the items 1,2,3", "3", False, True),  # official reads "1,2,3" as 123
    ("The answer is 18. Also 20.", "18", True, True),
    ("no numbers here", "5", False, False),
    ("The answer is \u22123.", "-3", False, True),  # a Unicode minus: the official regex reads 3
    ("The answer is 5. No. The answer is 7.", "7", True, True),  # the last marker
    ("The answer is 5. No, the answer is 7.", "7", False, True),  # official: the last "The answer is" in this case
    ("The answer is 1,080.00", "1080", True, True),
]


@pytest.mark.parametrize("text, answer, official, ours", OFFICIAL_GSM8K_CASES)
def test_official_gsm8k_rule(text, answer, official, ours):
    example = gsm8k(answer)
    assert ev.official_correct(example, text) is official
    assert ev.is_correct(example, ev.extract_answer(example, text)) is ours


# ---------------------------------------------------------------------------------------------------------------------
# ARC extraction

PLANET = [("A", "Planetary density will decrease."), ("B", "Planetary years will become longer."),
          ("C", "Planetary days will become shorter."), ("D", "Planetary gravity will become stronger.")]
SPEEDS = [("1", "2.5 m/s"), ("2", "5 m/s"), ("3", "10 m/s"), ("4", "20 m/s")]
LEGS = [("A", "4"), ("B", "8"), ("C", "14"), ("D", "16")]
STATES = [("A", "a solid"), ("B", "a liquid"), ("C", "a gas"), ("D", "a plasma")]
FIVE = [("A", "iron"), ("B", "copper"), ("C", "glass"), ("D", "aluminum"), ("E", "wood")]
THREE = [("A", "salt water"), ("B", "water"), ("C", "oil")]

ARC_CASES = [
    # (options, model output, extracted label)
    (PLANET, "Faster rotation means a shorter day. The answer is Planetary days will become shorter.", "C"),
    (PLANET, "The answer is: Planetary days will become shorter", "C"),
    (PLANET, "Days get shorter. The answer is (C).", "C"),
    (PLANET, "The answer is C.", "C"),
    (PLANET, "The answer is C) Planetary days will become shorter.", "C"),
    (PLANET, "Thus the answer is option C.", "C"),
    (PLANET, "**The answer is 'Planetary days will become shorter.'**", "C"),
    (PLANET, "Therefore, the correct answer is: planetary days will become shorter, because it spins faster.", "C"),
    (PLANET, "I will print my answer like 'The answer is (one of the options)'.", None),
    (PLANET, "I must end with 'The answer is (one of the options)'.\nThe answer is Planetary days will become shorter.",
     "C"),  # the LAST marker
    (PLANET, "The planet spins faster.\nPlanetary days will become shorter.", "C"),  # no marker: the last line
    (PLANET, "So the days get shorter.\nC", "C"),
    (PLANET, "**Answer:** B", "B"),
    (PLANET, "The answer is:\n\nPlanetary days will become shorter.", "C"),  # the answer on the next line
    (PLANET, "The answer is days will become shorter", "C"),  # shortened, but inside only one option
    (PLANET, "\u00e9\u00e9 clips ali milesabber", None),  # what a tiny random model writes
    (PLANET, "The answer is [Planetary days will become shorter.]", "C"),
    (PLANET, "The answer is \u201cPlanetary days will become shorter.\u201d", "C"),  # curly quotes
    (PLANET, "the answer is c", "C"),
    (PLANET, "The answer is C because the day is the time of one rotation.", "C"),
    (PLANET, "The answer is A.", "A"),
    (SPEEDS, "It moves 10 m in 2 s. The answer is 5 m/s.", "2"),  # exact option text beats the substring in 2.5 m/s
    (SPEEDS, "The answer is 2.5 m/s because it is slowest.", "1"),
    (SPEEDS, "The answer is 3.", "3"),  # numeric label
    (LEGS, "A spider has 8 legs. The answer is 14.", "C"),
    (LEGS, "The answer is 14 legs in total", "C"),  # option "4" is not inside "14"
    (STATES, "Ice melts into water. The answer is A liquid.", "B"),  # "A" here is the article, not option A
    (FIVE, "Wood does not conduct. The answer is (E).", "E"),
    (FIVE, "The answer is E: wood", "E"),
    (THREE, "The answer is D", None),  # no option D among three
    ([("A", "R"), ("B", "rr"), ("C", "Rr"), ("D", "RR")], "The offspring are all Rr. The answer is Rr.", "C"),
    (THREE, "Oil floats. The answer is salt water.", "A"),  # the longer option text wins at the same place
    (THREE, "Pure water is the answer.\nThe answer is water.", "B"),
    (THREE, "The answer is (oil). Oil floats on water.", "C"),  # another option in the next sentence
    (THREE, "The answer is water or oil.", None),  # two options: none
    (PLANET, "The answer is " + str([text for _, text in PLANET]), None),  # every option listed (SmolLM2): none
]


@pytest.mark.parametrize("choices, text, expected", ARC_CASES)
def test_extract_choice(choices, text, expected):
    assert ev.extract_choice(text, choices) == expected


def arc(choices, label):
    return data.arc_example("q", "Which?", choices, label)


EARTH = [("A", "the Earth's rotation"), ("B", "the Moon's gravity"), ("C", "the Sun's heat"), ("D", "ocean currents")]
VARIABLES = [("A", "the dependent variable"), ("B", "the independent (manipulated) variable"),
             ("C", "the control group"), ("D", "the hypothesis")]
GROUPS = [("A", "group 1 (1A)"), ("B", "group 2 (2A)"), ("C", "group 17 (7A)"), ("D", "group 18 (8A)")]
TIMES = [("A", "9:00 A.M."), ("B", "12:00 noon"), ("C", "1:00 P.M."), ("D", "6:00 P.M.")]
PLANET_LIST = "The answer is " + str([text for _, text in PLANET])  # what SmolLM2 writes: every option, as a list

# The official ARC rule (eval_utils.py's is_equiv_arc), worked out by hand for each output: lower-case everything and
# drop the gold's trailing "."; with "the answer is" anywhere, the span is the FIRST "."-separated sentence holding
# it, after that sentence's last "the answer is", with a leading ":" dropped and then ' " [ ] ( ) . and spaces (not
# newlines) stripped from both ends; without one, the whole text is stripped of those same characters first and the
# span is its last "."-separated fragment. Right when the gold is a substring of the span. Next to it, ours: the one
# option the output names is the gold. The official function cannot be imported here (it is not vendored and tests
# reach no network), so its verdicts were computed once by running that function on each row and transcribed.
OFFICIAL_ARC_CASES = [
    # (options, gold label, output, official verdict, our verdict)
    # the gold's trailing "."
    (PLANET, "C", "The answer is Planetary days will become shorter.", True, True),
    (PLANET, "C", "The answer is: Planetary days will become shorter.", True, True),
    (PLANET, "C", "The answer is 'Planetary days will become shorter.'", True, True),
    (PLANET, "C", "the answer is planetary days will become shorter", True, True),
    (PLANET, "A", "The answer is Planetary days will become shorter.", False, False),
    (PLANET, "C", "The answer is (C) Planetary days will become shorter.", True, True),  # "(" stripped, "c)" stays
    (PLANET, "C", "Faster spin. The answer is Planetary days will become shorter. Years stay the same.", True, True),
    # punctuation inside the answer is kept, and only its ends are stripped
    (EARTH, "A", "The answer is the Earth's rotation.", True, True),
    (EARTH, "A", "The answer is 'the Earth's rotation'.", True, True),
    (EARTH, "A", 'The answer is: "the Earth\'s rotation"', True, True),
    (VARIABLES, "B", "The answer is the independent (manipulated) variable.", True, True),
    (VARIABLES, "B", "The answer is [the independent (manipulated) variable].", True, True),
    (VARIABLES, "B", "The answer is the independent manipulated variable.", False, False),
    (GROUPS, "D", "The answer is group 18 (8A).", False, True),  # the gold's own ")" is stripped from the span
    (TIMES, "C", "The answer is 1:00 P.M.", False, True),  # the span ends at the first "." of "p.m"
    (SPEEDS, "1", "The answer is 2.5 m/s.", False, True),  # ... and of "2.5"
    (SPEEDS, "2", "The answer is 5 m/s.", True, True),
    (SPEEDS, "2", "The answer is 2.5 m/s.", False, False),  # the span is "2"
    (SPEEDS, "2", "The answer is 25 m/s", True, False),  # "5 m/s" is a substring of "25 m/s"
    # several "the answer is": the official rule reads the first sentence holding one, after its last one
    (THREE, "C", "The answer is water, but the answer is oil", True, True),  # one sentence: its last marker
    (THREE, "B", "The answer is water, but the answer is oil", False, False),
    (THREE, "B", "The answer is water. Wait, the answer is oil.", True, False),  # official: the first sentence
    (THREE, "C", "The answer is water. Wait, the answer is oil.", False, True),  # ours: the last marker
    (THREE, "B", "First, the answer is water? No. The answer is oil.", True, False),  # "?" ends no sentence there
    (THREE, "B", "Water sinks, so the answer is: oil! Not water.", True, False),  # nor does "!"
    (PLANET, "C", "I print 'The answer is (one of the options)'. The answer is Planetary days will become shorter.",
     False, True),  # official: the span is "one of the options"
    (PLANET, "C", "The answer is Planetary days will become shorter. I said 'the answer is (one of the options)'.",
     True, True),  # ours: "one of the options" names no option, so the last line
    (THREE, "C", "The Answer Is oil", True, True),  # any case
    (THREE, "C", "The answer is (oil). Oil floats on water.", True, True),
    # no "the answer is": the last "."-separated fragment, after the final "." is dropped
    (THREE, "C", "It must be oil.", True, True),
    (THREE, "C", "Oil floats, so I pick oil", True, True),
    (THREE, "C", "I pick oil. Water sinks.", False, True),  # official: the fragment is "water sinks"
    (THREE, "B", "I pick oil. Water sinks.", True, False),
    (PLANET, "C", "Planetary days will become shorter.", True, True),
    (PLANET, "C", "So I choose 'Planetary days will become shorter.'", True, True),  # ' and . stripped first
    (THREE, "C", "I choose (oil.)", True, True),
    (THREE, "C", "It must be oil.\n", False, True),  # official: a final newline is not stripped; the fragment is "\n"
    (PLANET, "C", "Planetary days will become shorter.\n\n", False, True),
    (THREE, "C", "The answer is oil.\n", True, True),  # with the marker, the sentence ends at the "."
    (PLANET, "C", "Days get shorter.", False, False),
    (PLANET, "C", "", False, False),
    # option labels: the official rule compares option texts only
    (THREE, "C", "The answer is C", False, True),
    (FIVE, "E", "The answer is (E).", False, True),
    (SPEEDS, "3", "The answer is 3.", False, True),
    (STATES, "B", "The answer is B: a liquid.", True, True),
    (STATES, "B", "The answer is A liquid.", True, True),  # "A" is the article
    (LEGS, "C", "The answer is 14 legs.", True, True),
    (LEGS, "A", "The answer is 14 legs.", True, False),  # "4" is a substring of "14"
    # several options, or every option listed
    (PLANET, "C", PLANET_LIST, False, False),  # the span ends at the first option's "."
    (PLANET, "A", PLANET_LIST, True, False),
    (THREE, "B", "The answer is ['salt water', 'water', 'oil']", True, False),
    (THREE, "C", "The answer is ['salt water', 'water', 'oil']", True, False),
    (THREE, "B", "The answer is water or oil.", True, False),
    (THREE, "A", "The answer is salt water.", True, True),
    (THREE, "B", "The answer is salt water.", True, False),  # "water" is a substring of "salt water"
]


@pytest.mark.parametrize("choices, label, text, official, ours", OFFICIAL_ARC_CASES)
def test_official_arc_rule(choices, label, text, official, ours):
    example = arc(choices, label)
    assert ev.official_correct(example, text) is official
    assert ev.is_correct(example, ev.extract_answer(example, text)) is ours


# ---------------------------------------------------------------------------------------------------------------------
# Scores


def test_majority_vote():
    assert ev.majority(["18", "20", "18", None]) == "18"
    assert ev.majority(["20", "18", "18", "20"]) == "20"  # a tie goes to the answer seen first
    assert ev.majority([None, None]) is None


def test_wilson_interval():
    low, high = ev.wilson_interval(50, 100)
    assert abs(low - 0.4038) < 1e-4 and abs(high - 0.5962) < 1e-4
    low, high = ev.wilson_interval(0, 5)
    assert low == pytest.approx(0.0, abs=1e-12) and abs(high - 0.4345) < 1e-4
    low, high = ev.wilson_interval(5, 5)
    assert abs(low - 0.5655) < 1e-4 and high == pytest.approx(1.0)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GSM8K_RECORDS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24.\nIn total 48+24 = <<48+24=72>>72.\n#### 72"},
    {"question": "Weng earns $12 an hour. She worked 50 minutes. How much did she earn?",
     "answer": "12/60 = $<<12/60=0.2>>0.2 per minute.\n0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
    {"question": "A shop sells 1,080 pens a week. How many in 2 weeks?", "answer": "1,080*2=2,160\n#### 2,160"},
    {"question": "Betty has 5 dollars and spends 8. What is her balance?", "answer": "5-8=-3\n#### -3"},
    {"question": "There are 3 boxes of 6 eggs. How many eggs?", "answer": "3*6=<<3*6=18>>18\n#### 18"},
]


class ScriptedGenerate:
    """Stands in for model.generate: the n-th call returns the n-th list of texts (one per row), each ending with
    the end-of-turn token, and records how it was called."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def __call__(self, model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, num_samples=1, seed=None, **_):
        texts = self.script[len(self.calls)]
        self.calls.append((len(prompts), num_samples, temperature, seed))
        assert len(texts) == len(prompts) * num_samples
        return [self.tokenizer.encode(t, add_special_tokens=False) + [self.tokenizer.eos_ids[0]] for t in texts]


def test_evaluate_scores_greedy_and_samples(tiny_llama_dir, tmp_path, monkeypatch):
    from model import load

    model, tokenizer = load(tiny_llama_dir)
    examples = data.read_jsonl(write_jsonl(tmp_path / "g.jsonl", GSM8K_RECORDS[:2]))  # golds 72 and 10
    greedy = ["The answer is 72.", "She earned $10. The answer is 10."]  # both right
    sampled = ["The answer is 72.", "The answer is 10.", "So 72",  # question 0: maj 72, right
               "The answer is 10.", "So 72", "The answer is 72!"]  # question 1: maj 72, wrong; pass@3 right
    fake = ScriptedGenerate(tokenizer, [greedy, sampled])
    monkeypatch.setattr(ev, "generate", fake)
    records, summary = ev.evaluate(model, tokenizer, examples, max_new_tokens=8, batch_size=2, samples=3,
                                   temperature=0.7, seed=5)
    assert fake.calls == [(2, 1, 0.0, None), (2, 3, 0.7, 5)]
    assert [r["answer"] for r in records] == ["72", "10"]
    assert [r["correct"] for r in records] == [True, True]
    assert records[0]["sample_answers"] == ["72", "10", "72"] and records[0]["maj_correct"]
    assert records[1]["sample_answers"] == ["10", "72", "72"]
    assert records[1]["maj_answer"] == "72" and not records[1]["maj_correct"] and records[1]["pass_correct"]
    assert all(r["finished"] for r in records) and records[0]["rationale"] == "The answer is 72."
    m = summary["metrics"]
    assert m["greedy"]["correct"] == 2 and m["maj@3"]["correct"] == 1 and m["pass@3"]["correct"] == 2
    assert summary["accuracy"] == 1.0 and summary["n"] == 2


def test_llama31_prompt_has_one_bos(tiny_llama3_dir, tmp_path, monkeypatch):
    """Llama 3.1's chat template writes <|begin_of_text|> itself. The official script encodes the rendered template
    with the tokenizer's BOS on top (two BOS); the prompts eval.py generates from must have exactly one."""
    from model import load

    model, tokenizer = load(tiny_llama3_dir)
    bos = tokenizer.bos_id
    examples = data.read_jsonl(write_jsonl(tmp_path / "g.jsonl", GSM8K_RECORDS[:2]))
    rendered = data.chat_prompt_text(tokenizer, examples[0])
    assert rendered.startswith("<|begin_of_text|>")
    assert tokenizer.tk.encode(rendered, add_special_tokens=True).ids[:2] == [bos, bos]  # the official encoding
    seen = []

    def generate(model, prompts, max_new_tokens, **kwargs):
        seen.extend(prompts)
        return [[tokenizer.eos_ids[0]] for _ in prompts]

    monkeypatch.setattr(ev, "generate", generate)
    records, _ = ev.evaluate(model, tokenizer, examples, max_new_tokens=4)
    assert len(seen) == 2 and all(p[0] == bos and p.count(bos) == 1 for p in seen)
    assert all(r["prompt"].count("<|begin_of_text|>") == 1 for r in records)


# ---------------------------------------------------------------------------------------------------------------------
# The command line, end to end on a tiny random model


def run_cli(argv, capsys):
    code = ev.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def five_questions(tmp_path):
    return write_jsonl(tmp_path / "five.jsonl", GSM8K_RECORDS)


def test_cli_writes_resumes_and_never_overwrites(tiny_llama_dir, five_questions, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs" / "tiny.jsonl"
    summary_file = tmp_path / "runs" / "tiny.summary.json"
    counting = {"prompts": 0}  # generate() calls go through, counted
    real_generate = ev.generate

    def generate(model, prompts, *args, **kwargs):
        counting["prompts"] += len(prompts)
        return real_generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(ev, "generate", generate)
    base = ["--model", tiny_llama_dir, "--dataset", five_questions, "--out", out, "--max-new-tokens", 6,
            "--batch-size", 2]

    code, log = run_cli(base + ["--limit", 3], capsys)
    assert code == 0, log
    assert counting["prompts"] == 3 and len(out.read_text().splitlines()) == 3
    assert json.loads(summary_file.read_text())["complete"] is True

    code, log = run_cli(base, capsys)  # the full run only generates for the 2 new questions
    assert code == 0, log
    assert counting["prompts"] == 5
    assert "3 already in" in log and "5/5" in log
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == [f"five-{i}" for i in range(5)]
    assert [r["gold"] for r in lines] == ["72", "10", "2160", "-3", "18"]
    assert all(1 <= r["tokens"] <= 6 for r in lines)
    summary = json.loads(summary_file.read_text())
    assert summary["n"] == 5 and summary["complete"] is True
    assert summary["metrics"]["greedy"]["correct"] == sum(r["correct"] for r in lines)
    assert summary["generated_tokens"] == sum(r["tokens"] for r in lines)
    assert summary["settings"]["max_new_tokens"] == 6 and summary["model"] == tiny_llama_dir

    before = out.read_bytes(), summary_file.read_bytes()
    code, log = run_cli(base, capsys)  # finished: nothing generated, nothing rewritten
    assert code == 0 and counting["prompts"] == 5
    assert (out.read_bytes(), summary_file.read_bytes()) == before

    code, log = run_cli(base[:-4] + ["--max-new-tokens", 7, "--batch-size", 2], capsys)  # other settings: refused
    assert code == 2 and "different settings" in log and "max_new_tokens" in log
    assert (out.read_bytes(), summary_file.read_bytes()) == before

    code, log = run_cli(base + ["--overwrite"], capsys)  # starts over, keeping the old files as .bak
    assert code == 0 and counting["prompts"] == 10
    assert Path(f"{out}.bak").read_bytes() == before[0]


def test_cli_resumes_after_a_torn_last_line(tiny_llama_dir, five_questions, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    base = ["--model", tiny_llama_dir, "--dataset", five_questions, "--out", out, "--max-new-tokens", 4]
    assert run_cli(base + ["--limit", 2], capsys)[0] == 0
    with open(out, "a") as f:
        f.write('{"id": "five-2", "prom')  # killed mid-write
    code, log = run_cli(base, capsys)
    assert code == 0, log
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [f"five-{i}" for i in range(5)]


def test_cli_bad_input(tiny_llama_dir, five_questions, tmp_path, capsys):
    out = tmp_path / "bad.jsonl"
    model = ["--model", tiny_llama_dir, "--out", out]

    code, log = run_cli(model + ["--dataset", "gsm9k"], capsys)
    assert code == 2 and "unknown dataset 'gsm9k'" in log and "gsm8k, arc_challenge" in log

    broken = write_jsonl(tmp_path / "broken.jsonl", GSM8K_RECORDS[:2] + [{"question": "no answer field"}])
    code, log = run_cli(model + ["--dataset", broken], capsys)
    assert code == 2 and f"{broken}:3" in log

    code, log = run_cli(model + ["--dataset", five_questions, "--limit", 0], capsys)
    assert code == 2 and "--limit 0: expected a positive integer" in log

    code, log = run_cli(model + ["--dataset", five_questions, "--no-greedy"], capsys)
    assert code == 2 and "--no-greedy needs --samples" in log

    code, log = run_cli(["--model", tiny_llama_dir, "--dataset", five_questions, "--out", tmp_path / "x.json"], capsys)
    assert code == 2 and "--out must end with .jsonl" in log

    foreign = tmp_path / "foreign.jsonl"  # results without a summary: settings unknown, so never touched
    foreign.write_text('{"id": "five-0"}\n')
    code, log = run_cli(["--model", tiny_llama_dir, "--dataset", five_questions, "--out", foreign], capsys)
    assert code == 2 and "settings are unknown" in log and foreign.read_text() == '{"id": "five-0"}\n'
    assert not out.exists()


def test_cli_checks_out_before_loading(tiny_llama_dir, five_questions, tmp_path, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(ev, "load", lambda *a, **k: loads.append(a) or pytest.fail("loaded the model"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me\n")
    base = ["--model", tiny_llama_dir, "--dataset", five_questions]
    code, log = run_cli(base + ["--out", a_file / "runs" / "r.jsonl"], capsys)
    assert code == 2 and f"{a_file} is a file, not a directory" in log and "Errno" not in log
    (tmp_path / "d.jsonl").mkdir()
    code, log = run_cli(base + ["--out", tmp_path / "d.jsonl"], capsys)
    assert code == 2 and "is a directory" in log
    assert loads == [] and a_file.read_text() == "keep me\n"


def test_cli_failed_load_leaves_nothing(tiny_llama_dir, five_questions, tmp_path, capsys):
    out = tmp_path / "runs" / "r.jsonl"
    base = ["--dataset", five_questions, "--out", out, "--max-new-tokens", 2, "--limit", 1]
    code, log = run_cli(["--model", tmp_path / "no-such-model"] + base, capsys)
    assert code == 2 and "no-such-model" in log
    assert not out.exists() and not ev.summary_path(out).exists() and not Path(f"{out}.lock").exists()
    code, log = run_cli(["--model", tiny_llama_dir] + base, capsys)  # the corrected rerun starts
    assert code == 0, log
    assert len(out.read_text().splitlines()) == 1


def test_cli_max_new_tokens_must_fit_the_context(tiny_llama_dir, five_questions, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("generated"))
    out = tmp_path / "r.jsonl"
    code, log = run_cli(["--model", tiny_llama_dir, "--dataset", five_questions, "--out", out,
                         "--max-new-tokens", 1_000_000], capsys)
    assert code == 2 and "--max-new-tokens 1000000" in log and "context of 512 tokens" in log
    from model import Tokenizer
    tokenizer = Tokenizer(tiny_llama_dir)
    longest = max(len(data.chat_prompt(tokenizer, ex)) for ex in data.read_jsonl(five_questions))
    assert f"at most {512 - longest} new tokens fit" in log
    assert not out.exists()


def test_cli_scores_only_this_selection(tiny_llama_dir, five_questions, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    base = ["--model", tiny_llama_dir, "--dataset", five_questions, "--out", out, "--max-new-tokens", 2]
    assert run_cli(base, capsys)[0] == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for i, r in enumerate(records):  # make the questions outside the selection count if they were scored
        r["correct"] = i >= 3
    write_jsonl(out, records)
    before = out.read_bytes(), ev.summary_path(out).read_bytes()
    code, log = run_cli(base + ["--limit", 3], capsys)
    assert code == 0, log
    assert "3 already in" in log and "0 to go" in log
    assert f"greedy ({five_questions}): 0/3 = 0.0%" in log and "2 records" in log and "outside this selection" in log
    assert (out.read_bytes(), ev.summary_path(out).read_bytes()) == before  # nothing rewritten


def test_choose_device():
    import parallel
    assert parallel.choose_device(None, 1, 0, cuda_available=False) == "cpu"
    assert parallel.choose_device(None, 1, 0, cuda_available=True) == "cuda"
    assert parallel.choose_device(None, 4, 3, cuda_available=True) == "cuda:3"
    assert parallel.choose_device("cuda", 4, 2, cuda_available=True) == "cuda:2"  # torchrun: one GPU per process
    assert parallel.choose_device("cuda:1", 1, 0, cuda_available=True) == "cuda:1"
    assert parallel.choose_device("cpu", 4, 2, cuda_available=True) == "cpu"
    assert parallel.choose_device(None, 2, 1, cuda_available=False) == "cpu"  # gloo on CPU
    with pytest.raises(ValueError, match="--device cuda:1: under torchrun each rank uses cuda:LOCAL_RANK"):
        parallel.choose_device("cuda:1", 4, 2, cuda_available=True)
    with pytest.raises(ValueError, match="--device cuda: no CUDA device is available"):
        parallel.choose_device("cuda", 1, 0, cuda_available=False)


def test_compare_reports_paired_flips(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": str(i), "correct": i < 5} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": str(i), "correct": 2 <= i < 9} for i in range(10)])
    code, report = run_cli(["--compare", a, b], capsys)
    assert code == 0, report
    assert "10 questions in common" in report
    assert "5/10 = 50.0%" in report and "7/10 = 70.0%" in report
    assert "4 wrong->right, 2 right->wrong, 4 unchanged" in report
    assert "p = 0.688" in report  # two-sided exact binomial: 2 * P(X <= 2 | n=6, p=1/2) = 2 * 22/64


def test_two_processes_equal_one(tiny_llama3_dir, five_questions, tmp_path):
    """torchrun with 2 gloo ranks shards the questions and gathers the same file a single process writes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # same threads: bitwise-equal matmuls
    args = ["--model", tiny_llama3_dir, "--dataset", five_questions, "--max-new-tokens", 8, "--batch-size", 2,
            "--samples", 2, "--temperature", 1.0]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    single = [sys.executable, "eval.py", *map(str, args), "--out", str(one)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "eval.py", *map(str, args), "--out", str(two)]
    for cmd in (single, torchrun):
        result = run_command(cmd, cwd=REPO, env=env, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    assert one.read_text() == two.read_text()
    assert json.loads((tmp_path / "two.summary.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------------------------------------------------------------
# Reliability: two runs on one file, disk full, mismatched comparisons, prompts longer than the context, bad flags


def test_cli_locks_the_results_file_and_counts_each_id_once(tiny_llama_dir, five_questions, tmp_path, capsys):
    """Two runs appending to one file wrote every id twice and the summary counted 2n: now a lock file keeps the
    second off, and a summary counts each id once (the first record) whatever the file holds."""
    import socket
    import subprocess
    out = tmp_path / "r.jsonl"
    lock = tmp_path / "r.jsonl.lock"
    base = ["--model", tiny_llama_dir, "--dataset", five_questions, "--out", out, "--max-new-tokens", 2]
    assert run_cli(base, capsys)[0] == 0
    assert not lock.exists()  # released at the end
    records = [json.loads(line) for line in out.read_text().splitlines()]
    right = sum(r["correct"] for r in records)
    write_jsonl(out, records + [r | {"correct": not r["correct"]} for r in records])  # as two runs leave it
    summary = json.loads(ev.summary_path(out).read_text())
    ev.summary_path(out).write_text(json.dumps(summary | {"complete": False}))
    code, log = run_cli(base, capsys)
    assert code == 0 and "0 to go" in log, log
    summary = json.loads(ev.summary_path(out).read_text())
    assert summary["n"] == 5 and summary["complete"] is True
    assert summary["metrics"]["greedy"] == ev.score(right, 5)  # the first record of each id

    before = out.read_bytes()
    holder = f"{socket.gethostname()} {os.getppid()}"  # alive (no start time recorded: taken as the same process)
    lock.write_text(holder)
    code, log = run_cli(base + ["--overwrite"], capsys)
    assert code == 2 and len(log.strip().splitlines()) == 1, log
    assert f"pid {os.getppid()}" in log and socket.gethostname() in log and f"delete {lock}" in log
    assert out.read_bytes() == before and lock.read_text() == holder  # untouched

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()} {dead.pid}")  # left behind by a process that died
    code, log = run_cli(base + ["--limit", 3], capsys)
    assert code == 0, log
    assert f"pid {dead.pid}" in log and "taking over" in log and not lock.exists()


def test_compare_refuses_different_questions(tmp_path, capsys):
    """Ids are <file stem>-<index>, so x1/test.jsonl and x2/test.jsonl share ids but not questions."""
    def results(name, question):
        return write_jsonl(tmp_path / name, [{"id": f"test-{i}", "prompt": f"{question} {i}?", "gold": str(i),
                                              "correct": i % 2 == 0} for i in range(6)])
    a = results("a.jsonl", "How many apples")
    same = results("same.jsonl", "How many apples")
    b = results("b.jsonl", "How many pears")
    code, log = run_cli(["--compare", a, same], capsys)
    assert code == 0 and "6 questions in common" in log, log
    code, log = run_cli(["--compare", a, b], capsys)
    assert code == 2 and len(log.strip().splitlines()) == 1, log
    assert "6 of the 6" in log and "test-0" in log and "questions in common" not in log


def test_compare_every_shared_metric(tmp_path, capsys):
    greedy = write_jsonl(tmp_path / "greedy.jsonl", [{"id": str(i), "correct": i < 2} for i in range(4)])
    sampled = [{"id": str(i), "sample_answers": ["1"] * 8, "maj_correct": i < 3, "pass_correct": True}
               for i in range(4)]
    samples_only = write_jsonl(tmp_path / "samples.jsonl", sampled)
    both = write_jsonl(tmp_path / "both.jsonl", [r | {"correct": i == 0} for i, r in enumerate(sampled)])
    code, log = run_cli(["--compare", greedy, samples_only], capsys)
    assert code == 2 and "share no metric" in log and "Traceback" not in log, log
    assert "greedy" in log and "maj@8" in log
    code, log = run_cli(["--compare", samples_only, both], capsys)
    assert code == 0, log
    assert "greedy" not in log and "maj@8" in log and "pass@8" in log
    code, log = run_cli(["--compare", greedy, both], capsys)
    assert code == 0 and "greedy" in log and "maj@8" not in log, log
    assert "2/4 = 50.0%" in log and "1/4 = 25.0%" in log


@pytest.mark.parametrize("failing", ["results", "summary"])
def test_cli_disk_full_is_one_line_and_resumes(failing, tiny_llama_dir, five_questions, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.jsonl"
    summary_file = ev.summary_path(out)
    base = ["--model", tiny_llama_dir, "--dataset", five_questions, "--out", out, "--max-new-tokens", 2,
            "--batch-size", 1]
    calls = []
    real_append, real_write_json, real_write = data.append_lines, data.write_json, os.write

    def full_append(path, lines):  # the third append fails part-way, through data.append_lines' own guard
        calls.append(path)
        if len(calls) != 3:
            return real_append(path, lines)

        def half(fd, body):
            real_write(fd, bytes(body[:7]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "write", half)
        try:
            return real_append(path, lines)
        finally:
            monkeypatch.setattr(os, "write", real_write)

    def full_write_json(path, obj):  # the third summary write (after the second batch) fails
        if Path(path) == summary_file:
            calls.append(path)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_json(path, obj)

    if failing == "results":
        monkeypatch.setattr(data, "append_lines", full_append)
    else:
        monkeypatch.setattr(data, "write_json", full_write_json)
    code, log = run_cli(base, capsys)
    where = out if failing == "results" else summary_file
    assert code != 0 and "Traceback" not in log
    assert f"error: {where}: could not write (No space left on device); 2 records saved, rerun the same command " \
           "to resume" in log
    assert out.read_text().endswith("\n") and len(out.read_text().splitlines()) == 2  # no torn record
    monkeypatch.undo()
    code, log = run_cli(base, capsys)
    assert code == 0 and "2 already in" in log, log
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [f"five-{i}" for i in range(5)]
    assert json.loads(summary_file.read_text())["complete"] is True


def test_cli_prompt_longer_than_the_context(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("generated"))
    long = write_jsonl(tmp_path / "long.jsonl", [GSM8K_RECORDS[0], GSM8K_RECORDS[1] | {
        "question": "How many? " + "Each apple weighs one pound more than the last. " * 40}])
    code, log = run_cli(["--model", tiny_llama_dir, "--dataset", long, "--out", tmp_path / "r.jsonl",
                         "--max-new-tokens", 4], capsys)
    assert code == 2 and "long-1" in log and "prompt alone" in log and "context of 512 tokens" in log, log
    assert "--max-new-tokens 4" not in log


@pytest.mark.parametrize("flags, error", [
    (["--limit", 0], "--limit 0: expected a positive integer"),
    (["--batch-size", -1], "--batch-size -1: expected a positive integer"),
    (["--max-new-tokens", 0], "--max-new-tokens 0: expected a positive integer"),
    (["--samples", -2], "--samples -2: expected 0 or more"),
    (["--top-p", 1.5], "--top-p 1.5: expected a number in (0, 1]"),
    (["--samples", 2, "--temperature", 0], "--temperature 0: expected"),
])
def test_cli_flag_ranges_before_anything_loads(flags, error, five_questions, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "load", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("loaded the data"))
    code, log = run_cli(["--model", "m", "--dataset", five_questions, "--out", tmp_path / "r.jsonl", *flags], capsys)
    assert code == 2 and error in log, log


def test_cli_accuracies_name_the_split(tiny_llama_dir, tmp_path, capsys):
    code, log = run_cli(["--model", tiny_llama_dir, "--dataset", "arith", "--split", "validation", "--limit", 2,
                         "--max-new-tokens", 2, "--out", tmp_path / "r.jsonl"], capsys)
    assert code == 0, log
    assert "greedy (arith validation): " in log and "greedy_official (arith validation): " in log
    assert "| greedy (arith validation) " in log  # the running line
    assert "held-out" not in log and "held out" not in log


# ---------------------------------------------------------------------------------------------------------------------
# Round 2 sweep: resumes that would mix other questions, weights or seeds into a file; exact numbers; Ctrl-C


def test_a_large_gold_is_compared_exactly():
    assert not ev.is_correct(gsm8k("1000000"), "1000001") and not ev.is_correct(gsm8k("1000000"), "999999")
    assert ev.is_correct(gsm8k("18"), ev.canonical_number("18.00"))


def test_resume_refuses_changed_questions_and_changed_weights(tiny_llama_dir, five_questions, tmp_path, capsys):
    import shutil
    out = tmp_path / "r.jsonl"
    base = ["--dataset", five_questions, "--out", out, "--max-new-tokens", 2, "--limit", 2]
    assert run_cli(["--model", tiny_llama_dir, *base], capsys)[0] == 0
    rows = Path(five_questions).read_text().splitlines()
    Path(five_questions).write_text("\n".join([json.dumps(GSM8K_RECORDS[4])] + rows) + "\n")  # a row on top
    code, log = run_cli(["--model", tiny_llama_dir, *base[:-2]], capsys)
    assert code == 2 and "records are of other questions under the same ids" in log, log
    Path(five_questions).write_text("\n".join(rows) + "\n")
    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    out2 = tmp_path / "r2.jsonl"
    assert run_cli(["--model", model, *base[:2], "--out", out2, *base[4:]], capsys)[0] == 0
    from conftest import make_tiny_model
    other = make_tiny_model(tmp_path / "other", tie_word_embeddings=True, seed=5)
    shutil.copy(Path(other) / "model.safetensors", model / "model.safetensors")  # other weights, same path
    code, log = run_cli(["--model", model, *base[:2], "--out", out2, "--max-new-tokens", 2], capsys)
    assert code == 2 and "different settings (weights:" in log, log


def test_sampled_resume_keeps_each_questions_seed(tiny_llama_dir, five_questions, tmp_path, capsys):
    flags = ["--model", tiny_llama_dir, "--dataset", five_questions, "--max-new-tokens", 3, "--samples", 2,
             "--batch-size", 2]
    assert run_cli([*flags, "--out", tmp_path / "straight.jsonl"], capsys)[0] == 0
    assert run_cli([*flags, "--out", tmp_path / "resumed.jsonl", "--limit", 2], capsys)[0] == 0
    assert run_cli([*flags, "--out", tmp_path / "resumed.jsonl"], capsys)[0] == 0
    a, b = ([json.loads(line)["sample_rationales"] for line in open(tmp_path / f)]
            for f in ("straight.jsonl", "resumed.jsonl"))
    assert a == b


def test_overwrite_keeps_every_earlier_file_and_ctrl_c_is_one_line(tiny_llama_dir, five_questions, tmp_path,
                                                                     monkeypatch, capsys):
    out = tmp_path / "r.jsonl"
    base = ["--model", tiny_llama_dir, "--dataset", five_questions, "--out", out, "--max-new-tokens", 2]
    for limit in (1, 2, 3):
        assert run_cli([*base, "--limit", limit, "--overwrite"], capsys)[0] == 0
    assert [len(Path(f"{out}{s}").read_text().splitlines()) for s in (".bak", ".bak1", "")] == [1, 2, 3]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "evaluate", interrupted)
    code, log = run_cli([*base, "--limit", 4], capsys)
    assert code == 130 and log.strip().splitlines() == [log.strip().splitlines()[0]] + [
        "error: interrupted; the questions finished so far are saved: rerun the same command to resume"], log
    assert not Path(f"{out}.lock").exists()
