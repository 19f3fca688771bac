"""Zero-shot evaluation on GSM8K and ARC-Challenge with the LaTRO paper's protocol (§5 and the official
scripts/evaluation.py): the question in the model's chat template with the chain-of-thought trigger (data.py), greedy
decoding of up to 500 new tokens, and the answer extracted from the model's own "The answer is ..."; optionally K
sampled rationales per question for maj@K (the paper's "maj@8" at T = 1) and pass@K, which the official repo lacks.
`official_correct` reimplements the official answer rule, reported next to ours. Our prompts have one BOS; the
official script's Llama 3.1 prompts have two (the template's <|begin_of_text|> and the tokenizer's own).

    python eval.py --model smollm2-135m --dataset gsm8k --limit 100
    python eval.py --model out/latro/final --dataset arc_challenge --samples 8 --temperature 1.0
    torchrun --nproc_per_node 8 eval.py --model llama-3.1-8b --dataset gsm8k
    python eval.py --compare runs/eval/base.jsonl runs/eval/trained.jsonl

Results go to a JSONL file, a record per question appended after every batch (a rerun resumes it), and a summary
JSON beside it, both created once the model and data have loaded; a lock file keeps other runs off them meanwhile.
A run scores the questions it selects (--limit N: the first N), each once. train.py calls `evaluate()` directly.
"""

import argparse
import json
import math
import os
import re
import signal
import sys
import time
from collections import Counter
from decimal import Decimal
from contextlib import contextmanager
from pathlib import Path

import torch

import data
from model import fingerprint, generate, load, resolve, resolve_dtype
from parallel import (NON_NEGATIVE, POSITIVE, UNIT, check_flags, on_rank0, release_lock, run_main,
                      setup_distributed, take_lock)

# ---------------------------------------------------------------------------------------------------------------------
# 1. The evaluation loop


def evaluate(model, tokenizer, examples, max_new_tokens=500, batch_size=16, samples=0, temperature=1.0, top_p=1.0,
             seed=0, greedy=True, on_records=None, compiled=False):
    """-> (records in question order, summary); no file I/O. greedy: a greedy rationale per question (the paper's main
    numbers); samples: K sampled ones at `temperature` for maj@K and pass@K. Under torch.distributed each round of
    world_size × batch_size questions is split across ranks and gathered, so every rank returns what one process
    would. Question i samples with seed + i, or with seed[i] when seed is a list (a resumed run keeps each
    question's seed); on_records(new) is called on every rank after each round. compiled: decode with
    model.generate's compiled fixed-shape step (the same tokens)."""
    if not greedy and not samples:
        raise ValueError("evaluate: nothing to do (greedy=False and samples=0)")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    was_training, start_time, records = model.training, time.time(), []
    model.eval()
    for start in range(0, len(examples), batch_size * world):
        first = start + rank * batch_size
        mine = examples[first:first + batch_size]
        seeds = seed[first:first + batch_size] if isinstance(seed, list) else seed + first
        new = evaluate_batch(model, tokenizer, mine, max_new_tokens, greedy, samples, temperature, top_p, seeds,
                             compiled) if mine else []
        if distributed:  # every rank joins every round, even with no questions left, so the gather cannot hang
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, new)
            new = [r for part in gathered for r in part]
        records += new
        if on_records is not None:
            on_records(new)
    model.train(was_training)
    seconds, summary = time.time() - start_time, summarize(records)
    return records, summary | {"seconds": seconds, "tokens_per_s": summary["generated_tokens"] / max(seconds, 1e-9)}


def gold_of(example):
    return example.label if example.task == "arc_challenge" else canonical_number(example.answer)


def evaluate_batch(model, tokenizer, examples, max_new_tokens, greedy, samples, temperature, top_p, seed,
                   compiled=False) -> list[dict]:
    """One batch of questions: a greedy rationale each and/or `samples` sampled ones; one record per question."""
    prompts = [data.chat_prompt(tokenizer, ex) for ex in examples]
    stop_ids = set(model.args.eos_token_ids)

    def decode(ids):  # the text without its end-of-turn token, and whether it ended on its own (not at the cap)
        finished = bool(ids) and ids[-1] in stop_ids
        return tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=True), finished

    records = []
    for ex, prompt in zip(examples, prompts):
        gold = {"gold": gold_of(ex)} | ({"gold_text": ex.answer} if ex.task == "arc_challenge" else {})
        records.append({"id": ex.id, "question": ex.question, "prompt": tokenizer.decode(prompt)} | gold)
    if greedy:
        for ex, record, ids in zip(examples, records, generate(model, prompts, max_new_tokens, temperature=0.0,
                                                                     compiled=compiled)):
            text, finished = decode(ids)
            answer = extract_answer(ex, text)
            record |= {"rationale": text, "answer": answer, "correct": is_correct(ex, answer),
                       "official_correct": official_correct(ex, text), "tokens": len(ids), "finished": finished}
    if samples:
        outputs = generate(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                           num_samples=samples, seed=seed, compiled=compiled)
        for i, (ex, record) in enumerate(zip(examples, records)):
            rows = outputs[i * samples:(i + 1) * samples]
            texts = [decode(ids)[0] for ids in rows]
            answers = [extract_answer(ex, t) for t in texts]
            vote = majority(answers)
            record |= {"sample_rationales": texts, "sample_answers": answers,
                       "sample_correct": [is_correct(ex, a) for a in answers], "sample_tokens": [len(r) for r in rows],
                       "maj_answer": vote, "maj_correct": is_correct(ex, vote),
                       "pass_correct": any(is_correct(ex, a) for a in answers)}
    return records


# ---------------------------------------------------------------------------------------------------------------------
# 2. Scores


def summarize(records: list[dict]) -> dict:
    """Accuracies (with 95% Wilson intervals) and token counts of a list of per-question records."""
    n, metrics = len(records), {}
    if records and "correct" in records[0]:
        metrics["greedy"] = score(sum(r["correct"] for r in records), n)
        metrics["greedy_official"] = score(sum(r["official_correct"] for r in records), n)
    if records and "maj_correct" in records[0]:
        k = len(records[0]["sample_answers"])
        metrics[f"maj@{k}"] = score(sum(r["maj_correct"] for r in records), n)
        metrics[f"pass@{k}"] = score(sum(r["pass_correct"] for r in records), n)
    headline = next(iter(metrics.values()), score(0, 0))  # greedy if there is one, else maj@K
    return {"n": n, "accuracy": headline["accuracy"], "ci95": headline["ci95"], "metrics": metrics,
            "no_answer": sum(r.get("answer", "") is None for r in records),
            "unfinished": sum(not r.get("finished", True) for r in records),  # greedy rationales cut at max_new_tokens
            "generated_tokens": sum(r.get("tokens", 0) + sum(r.get("sample_tokens", [])) for r in records)}


def score(correct: int, n: int) -> dict:
    low, high = wilson_interval(correct, n)
    return {"correct": correct, "n": n, "accuracy": correct / n if n else 0.0, "ci95": [round(low, 6), round(high, 6)]}


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% confidence interval for a proportion; unlike p ± 1.96·se it stays inside [0, 1] and works at p = 0 or 1."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def majority(answers: list[str | None]) -> str | None:
    """The most common extracted answer; ties go to the one seen first; unanswered samples do not vote."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(a for a in answers if votes[a] == best)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Answer extraction (ours)


def extract_answer(example: data.Example, text: str) -> str | None:
    """GSM8K: the canonical number; ARC: the chosen option's label."""
    return extract_choice(text, example.choices) if example.task == "arc_challenge" else extract_number(text)


def is_correct(example: data.Example, answer: str | None) -> bool:
    """GSM8K: the same number as the gold; ARC: the gold option's label."""
    if answer is None:
        return False
    if example.task == "arc_challenge":
        return answer == example.label
    return Decimal(answer) == Decimal(example.answer)  # exact: "18.0" == "18", 2**53 + 1 != 2**53


# A number: "1,080" (thousands separators only in groups of three), "18", "3.5", ".5". A "-" is a sign only when it
# does not follow a word or a closing bracket, so "5-3" is two numbers, "x = -3" is one.
NUMBER = re.compile(r"(?:(?<![\w)\]])-)?(?:\d{1,3}(?:,\d{3})+(?![\d,])(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


def extract_number(text: str) -> str | None:
    """The GSM8K answer in a rationale: the first number after the last "The answer is", else the last number."""
    text = text.replace("\u2212", "-")  # typographic minus
    answer_is = list(ANSWER_IS.finditer(text))
    after = NUMBER.findall(text[answer_is[-1].end():])[:1] if answer_is else []
    numbers = after or NUMBER.findall(text)[-1:]
    return canonical_number(numbers[0]) if numbers else None


def canonical_number(text: str) -> str:
    """'1,080' -> '1080', '18.00' -> '18', '-0.50' -> '-0.5': one spelling per value, so majority votes agree."""
    text = text.replace(",", "")
    if "." not in text:
        return str(int(text))
    value = float(text)
    return str(int(value)) if value.is_integer() else repr(round(value, 6))


ANSWER_MARK = re.compile(r"\banswer\s*(?:is\b|:)", re.IGNORECASE)  # ARC: also "The correct answer is", "Answer:"
SENTENCE_END = re.compile(r"[.!?]\s")  # "2.5 m/s" and "decrease.', 'Planetary" do not end a sentence
# How a span may name an option by its label: "(C)", "[c]", "C)", "C.", "C:", "C" alone, "option C", or a capital
# B-Z starting the span ("C because ..."). A capital A followed by a word is left alone: it is usually the article
# ("A solid turns into a liquid"), not option A.
LABEL_PATTERNS = [
    re.compile(r"^[(\[]([A-Za-z0-9])[)\]]"),
    re.compile(r"^([A-Z0-9])[).:](?!\d)"),
    re.compile(r"^([A-Za-z0-9])$"),
    re.compile(r"\b(?:option|choice)\s*[(\[]?([A-Za-z0-9])\b", re.IGNORECASE),
    re.compile(r"^([B-Z])\b(?![.,]\d)"),
]


def extract_choice(text: str, choices: list[tuple[str, str]]) -> str | None:
    """The label of the ARC option the rationale settles on, or None. It should be after the last "answer is" or
    "Answer:" (to the end of that line, or the next line if that is empty); failing that, on the last non-empty line."""
    marks = list(ANSWER_MARK.finditer(text))
    rest = text[marks[-1].end():].lstrip(" \t:*") if marks else ""
    spans = [line for line in rest.split("\n") if line.strip(" \t:*")][:1]
    spans += [line for line in text.split("\n") if line.strip()][-1:]
    for span in spans:
        label = match_option(span, choices)
        if label is not None:
            return label
    return None


def match_option(span: str, choices: list[tuple[str, str]]) -> str | None:
    """The label of the one option `span` names, or None."""
    span = span.strip().strip("*_`\"' ").strip()
    labels, wanted = [label for label, _ in choices], normalize(span)
    # 1. The option's exact text, possibly after its label: "Planetary days will become shorter." or "C. Planetary...";
    # same case first: genetics options can differ only in case ("Rr", "rr", "RR").
    exact = [label for label, text in choices if span.rstrip(".") == text.rstrip(".")] or \
        [label for label, text in choices if wanted == normalize(text)]
    if exact:
        return exact[0]
    for pattern in LABEL_PATTERNS[:2]:
        m = pattern.match(span)
        label = m.group(1).upper() if m else None
        if label in labels and normalize(span[m.end():]) == normalize(dict(choices)[label]):
            return label
    # 2. The label alone.
    for pattern in LABEL_PATTERNS:
        m = pattern.search(span)
        if m and m.group(1).upper() in labels:
            return m.group(1).upper()
    # 3. An option's text inside the span ("Planetary days will become shorter, because ..."). An option found only
    # inside another one's text ("water" in "salt water") does not count. The sentence of the earliest option must
    # name no other: "(oil). Oil floats on water." is oil, "water or oil" and SmolLM2's habit of listing every option
    # ("['...', '...', '...', '...']") are none.
    found = [(m.start(), m.end(), label) for label, text in choices if (m := find_words(normalize(text), wanted))]
    found = [(start, end, label) for start, end, label in found
             if not any(s <= start and end <= e and e - s > end - start for s, e, _ in found)]
    if found:
        sentence_end = SENTENCE_END.search(wanted, min(found)[1])
        named = {label for start, _, label in found if not sentence_end or start < sentence_end.start()}
        return named.pop() if len(named) == 1 else None
    # 4. The span inside exactly one option's text (the model shortened it: "days will become shorter").
    inside = [label for label, text in choices if find_words(wanted, normalize(text))] if len(wanted) >= 3 else []
    return inside[0] if len(inside) == 1 else None


def normalize(text: str) -> str:
    """Lower case, straight quotes, single spaces, no punctuation or markdown at either end."""
    text = text.lower().replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')
    return " ".join(text.split()).strip(" .,:;!?'\"`*()[]{}")


def find_words(phrase: str, text: str):
    """Where `phrase` occurs in `text` as whole words (option "4" is not in "14 legs"), or None."""
    return re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", text) if phrase else None


# ---------------------------------------------------------------------------------------------------------------------
# 4. The official rule (eval_utils.py), reimplemented to be reported next to ours


OFFICIAL_NUMBER = re.compile(r"-?[\d,]*\.?\d+")  # the official eval_utils.py regex
OFFICIAL_ENDS = " '[]()\"."  # what the official ARC rule strips from both ends of its span (not newlines)


def official_correct(example: data.Example, text: str) -> bool:
    """The official eval_utils.py verdict (is_equiv_gsm8k, is_equiv_arc), so that numbers can be compared with the
    paper's. Where ours departs from it:
      - GSM8K: the official code matches "The answer is" case-sensitively with the regex -?[\\d,]*\\.?\\d+; we match
        it in any case, read "1,080" as one number but "1,2,3" as three, do not read the "-" of "5-3" as a sign, and
        read a Unicode minus ("−3", U+2212) as one (the official regex reads 3).
      - ARC: the official span is the FIRST sentence (split at ".", not at "?" or "!") holding "the answer is", after
        its last "the answer is" and a leading ":"; without one, the text's last "."-separated fragment. The span, or
        the text before it is split, is stripped of ' " [ ] ( ) . and spaces at both ends, not of newlines ("oil.\\n"
        leaves the fragment "\\n"). It is right when the lower-cased gold text, less a final ".", is a substring of
        the span: "salt water" is right for the gold "water", a span naming two options is right when one is the
        gold, and a gold with a "." inside ("2.5 m/s") or ending in ")" never is. We read after the LAST "answer is"
        or "Answer:", map that span to ONE option (by its text, its label "(C)", "option C", or its text inside the
        span; a span naming several names none) and compare labels.
    """
    if example.task == "gsm8k":
        after = OFFICIAL_NUMBER.findall(text.split("The answer is")[-1]) if "The answer is" in text else []
        numbers = after[:1] or OFFICIAL_NUMBER.findall(text)[-1:]
        return bool(numbers) and float(numbers[0].replace(",", "")) == float(example.answer)
    if "the answer is" in text.lower():
        sentence = next(s.lower() for s in text.split(".") if "the answer is" in s.lower())
        span = sentence.split("the answer is")[-1].lstrip(":").strip(OFFICIAL_ENDS)
    else:
        span = text.lower().strip(OFFICIAL_ENDS).split(".")[-1]
    return bool(text) and example.answer.lower().strip().rstrip(".") in span


# ---------------------------------------------------------------------------------------------------------------------
# 5. Result files: records appended to a .jsonl, the settings they were made with in a .summary.json, a .lock held


def summary_path(out: Path) -> Path:
    return out.with_name(out.name[: -len(".jsonl")] + ".summary.json")


def read_records(path: Path) -> list[dict]:
    """A results file's records, one per question id: the first, where the file holds an id twice."""
    records = {}
    for number, record in data.read_jsonl_rows(path, "result record"):
        if not isinstance(record, dict) or "id" not in record:
            raise ValueError(f"{path}:{number}: expected a result record with an 'id'")
        records.setdefault(record["id"], record)
    return list(records.values())


def check_output(out: Path) -> None:
    """Before anything loads or is written: an error if `out` can never be written."""
    parent = next(p for p in out.parents if p.exists())  # the directories below it are still to be created
    for broken, why in [(out.is_dir(), "is a directory; expected the path of a .jsonl results file"),
                        (not parent.is_dir(), f"{parent} is a file, not a directory"),
                        (not os.access(parent, os.W_OK | os.X_OK) or out.exists() and not os.access(out, os.W_OK),
                         "not writable (permission denied)")]:
        if broken:
            raise ValueError(f"--out {out}: {why}")


@contextmanager
def locked(out: Path, rank: int):
    """Holds <out>.lock (parallel.take_lock) while a run uses `out`: two runs never append to one file."""
    lock = out.with_name(out.name + ".lock")
    on_rank0(rank, lambda: (lock.parent.mkdir(parents=True, exist_ok=True), take_lock(str(lock), str(out))))
    try:
        yield
    finally:
        if rank == 0:
            release_lock(str(lock))


def resumable(out: Path, settings: dict, overwrite: bool) -> dict[str, dict]:
    """{id: record} of the questions already in `out` (none with --overwrite); an error if it was written with other
    settings. Writes nothing."""
    if overwrite or not out.exists():
        return {}
    summary_file, retry = summary_path(out), "choose another --out or pass --overwrite"
    if not summary_file.exists():
        raise ValueError(f"{out} exists but {summary_file} does not, so its settings are unknown; {retry}")
    try:
        previous = json.loads(summary_file.read_text()).get("settings") or {}
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{summary_file}: not a summary written by eval.py; {retry}") from None
    if "weights" not in previous:
        raise ValueError(f"{out} was written by an eval.py that did not record the model's weights, so they cannot be "
                         f"checked; {retry}")
    if previous != settings:
        differ = ", ".join(f"{k}: {previous.get(k)!r} there, {v!r} now"
                           for k, v in settings.items() if previous.get(k) != v)
        raise ValueError(f"{out} was written with different settings ({differ}); {retry}")
    return {r["id"]: r for r in read_records(out)}


def start_output(out: Path, settings: dict, overwrite: bool) -> None:
    """Makes `out` ready for appending; called once the model, tokenizer and data have loaded, so that a failed load
    leaves nothing behind."""
    summary_file = summary_path(out)
    if overwrite and out.exists():  # kept, not deleted (--overwrite can be a typo): the first free .bak[N]
        n = next(n for n in range(10**6) if not any(p.with_name(p.name + f".bak{n or ''}").exists()
                                                     for p in (out, summary_file)))
        for path in (out, summary_file):
            if path.exists():
                os.replace(path, path.with_name(path.name + f".bak{n or ''}"))
        print(f"--overwrite: moved the previous results to {out}.bak{n or ''}")
    with writing(out, out):
        if not out.exists():  # the settings first: a crash leaves a resumable pair
            data.write_json(summary_file, {"settings": settings, "complete": False})
            out.touch()
        with open(out, "rb+") as f:  # a last line torn by a killed run is dropped: appends start on a fresh line
            f.truncate(f.read().rfind(b"\n") + 1)


def append_records(out: Path, records: list[dict]) -> None:
    data.append_lines(out, [json.dumps(r, ensure_ascii=False) for r in records])


@contextmanager
def writing(path: Path, out: Path):
    """A failed write of `path` (a full disk, ...) becomes one line saying what is saved and how to go on."""
    try:
        yield
    except OSError as e:
        saved = len(read_records(out)) if out.exists() else 0
        raise ValueError(f"{path}: could not write ({e.strerror or e}); {saved} records saved, rerun the same "
                         "command to resume") from None


# ---------------------------------------------------------------------------------------------------------------------
# 6. Comparing two runs


METRICS = {"correct": "greedy", "maj_correct": "maj@{k}", "pass_correct": "pass@{k}"}  # the record keys compared


def compare(path_a: str, path_b: str) -> str:
    """Paired comparison of two result files on their common questions (e.g. base model vs LaTRO-trained), for each
    metric both hold. Records with one id must be one question: the same prompt and gold."""
    runs = []
    for path in (path_a, path_b):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such results file")
        runs.append({r["id"]: r for r in read_records(Path(path))})
    a, b = runs
    ids = [i for i in a if i in b]
    if not ids:
        raise ValueError(f"{path_a} and {path_b} have no question ids in common")
    differ = [i for i in ids if any(a[i].get(k) != b[i].get(k) for k in ("prompt", "gold"))]
    if differ:
        raise ValueError(f"{path_a} and {path_b} hold different questions under the same ids: {len(differ)} of the "
                         f"{len(ids)} ids they share differ in prompt or gold (e.g. {differ[0]})")

    def name(key, run):  # "maj@8", as the file's first common record has it
        return METRICS[key].format(k=len(run[ids[0]].get("sample_answers", [])))

    shared = [key for key in METRICS if all(key in a[i] and key in b[i] for i in ids)]
    if not shared:
        held = [", ".join(name(key, run) for key in METRICS if key in run[ids[0]]) or "no metric" for run in runs]
        raise ValueError(f"{path_a} holds {held[0]} and {path_b} holds {held[1]}: they share no metric to compare")
    lines = [f"{len(ids)} questions in common{dataset_of(path_a)}"]
    for key in shared:
        lines.append(" vs ".join(dict.fromkeys([name(key, a), name(key, b)])) + ":")
        lines += paired([bool(a[i][key]) for i in ids], [bool(b[i][key]) for i in ids], path_a, path_b)
    return "\n".join(lines)


def paired(right_a: list[bool], right_b: list[bool], path_a: str, path_b: str) -> list[str]:
    """Both accuracies, their difference with a paired 95% CI, and McNemar's exact test: only the questions that
    flipped carry information, and under "no difference" each flip is a fair coin (a two-sided binomial tail)."""
    n = len(right_a)
    gained = sum(b and not a for a, b in zip(right_a, right_b))  # wrong in A, right in B
    lost = sum(a and not b for a, b in zip(right_a, right_b))
    flips, diff = gained + lost, (gained - lost) / n
    p = min(1.0, 2 * sum(math.comb(flips, k) for k in range(min(gained, lost) + 1)) / 2**flips) if flips else 1.0
    se = math.sqrt(max(flips - (gained - lost) ** 2 / n, 0.0)) / n
    return [f"  A {path_a}: {sum(right_a)}/{n} = {sum(right_a) / n:.1%}",
            f"  B {path_b}: {sum(right_b)}/{n} = {sum(right_b) / n:.1%}",
            f"  B - A: {diff:+.1%} (95% CI {diff - 1.96 * se:+.1%} to {diff + 1.96 * se:+.1%}, paired)",
            f"  flipped: {gained} wrong->right, {lost} right->wrong, {n - flips} unchanged",
            f"  McNemar exact test on the {flips} flips: p = {p:.3g}"
            + (" (no evidence of a difference at 5%)" if p >= 0.05 else " (significant at 5%)")]


def dataset_of(path: str) -> str:
    """' (arith test)': the dataset and split in the settings beside a results file; '' without them."""
    try:
        settings = json.loads(summary_path(Path(path)).read_text())["settings"]
        return " (" + " ".join(str(settings[k]) for k in ("dataset", "split") if settings.get(k)) + ")"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""


# ---------------------------------------------------------------------------------------------------------------------
# 7. Command line


def main(argv=None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's preemption stops it as Ctrl-C does
    try:
        args = parse_args(argv)
        if args.compare:
            print(compare(*args.compare))
            return 0
        return run(args, rank)
    except (ValueError, FileNotFoundError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if rank == 0:
            print("error: interrupted; the questions finished so far are saved: rerun the same command to resume",
                  file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(args, rank) -> int:
    out = Path(args.out) if args.out else default_out(args)
    device, _, _ = setup_distributed(args.device)
    dtype = resolve_dtype(args.dtype, device)
    settings = run_settings(args, dtype)
    label = f"{args.dataset} {settings['split']}" if settings["split"] else args.dataset  # every accuracy names it
    on_rank0(rank, lambda: check_output(out))
    with locked(out, rank):
        done = on_rank0(rank, lambda: resumable(out, settings, args.overwrite))
        examples = data.load_dataset(args.dataset, args.split, args.limit)
        changed = [ex.id for ex in examples if ex.id in done and (done[ex.id].get("question", ex.question),
                                                                  done[ex.id]["gold"]) != (ex.question, gold_of(ex))]
        if changed:
            raise ValueError(f"{out}: {len(changed)} of its records are of other questions under the same ids (e.g. "
                             f"{changed[0]}): the dataset changed since; choose another --out or pass --overwrite")
        selected, summary_file = {ex.id for ex in examples}, summary_path(out)
        pending = [ex for ex in examples if ex.id not in done]
        if rank == 0:
            print(f"{args.model} on {label}: {len(examples)} questions, {len(examples) - len(pending)} already in "
                  f"{out}, {len(pending)} to go", flush=True)
        if pending:
            model, tokenizer = load(args.model, device=device, dtype=dtype)
            check_context(model, tokenizer, pending, args.max_new_tokens)
            on_rank0(rank, lambda: start_output(out, settings, args.overwrite))  # inputs loaded: now create outputs
            start, new_records = time.time(), []
            so_far = [r for r in read_records(out) if r["id"] in selected] if rank == 0 else []

            def on_records(new):  # rank 0 appends each round to the results file and refreshes the summary
                with writing(out, out):
                    append_records(out, new)
                new_records.extend(new)
                so_far.extend(new)
                running, elapsed = summarize(so_far), time.time() - start
                print(f"  {len(examples) - len(pending) + len(new_records)}/{len(examples)} | "
                      f"{next(iter(running['metrics']))} ({label}) {running['accuracy']:.1%} | "
                      f"{summarize(new_records)['generated_tokens'] / elapsed:.0f} tok/s | {elapsed:.0f}s", flush=True)
                with writing(summary_file, out):
                    data.write_json(summary_file, {"settings": settings, "complete": False, **running})

            seeds = [args.seed + i for i, ex in enumerate(examples) if ex.id not in done]  # as a straight run's
            _, run_summary = evaluate(model, tokenizer, pending, args.max_new_tokens, args.batch_size, args.samples,
                                      args.temperature, args.top_p, seeds, greedy=not args.no_greedy,
                                      on_records=on_records if rank == 0 else None, compiled=args.compile)
        if rank != 0:
            return 0
        records = read_records(out)
        scored = [r for r in records if r["id"] in selected]  # this run's selection only
        summary = {"model": args.model, "dataset": args.dataset, "split": settings["split"], "settings": settings,
                   "complete": len(scored) == len(selected), "out": str(out)} | summarize(scored)
        if len(scored) < len(records):
            summary["outside_selection"] = len(records) - len(scored)
            print(f"{len(records) - len(scored)} records in {out} are for questions outside this selection "
                  f"(e.g. an earlier run without --limit): kept, not scored")
        if pending:  # speed of this invocation (a resumed run reports only its own part)
            summary |= {"new_questions": len(pending), "seconds": round(run_summary["seconds"], 3),
                        "tokens_per_s": round(run_summary["tokens_per_s"], 1), "batch_size": args.batch_size,
                        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}
        if pending or json.loads(summary_file.read_text()).get("complete") is not True:  # else it is written already
            with writing(summary_file, out):
                data.write_json(summary_file, summary)
    for name, m in summary["metrics"].items():
        print(f"{name} ({label}): {m['correct']}/{m['n']} = {m['accuracy']:.1%} "
              f"(95% CI {m['ci95'][0]:.1%}-{m['ci95'][1]:.1%})")
    print(f"results: {out}\nsummary: {summary_file}")
    return 0


def parse_args(argv):
    """The flags; a bad value is a ValueError that names its flag (argparse itself checks only the types)."""
    p = argparse.ArgumentParser(description="Zero-shot CoT evaluation (greedy, maj@K, pass@K) with the LaTRO protocol.")
    p.add_argument("--model", help="model directory, Hugging Face hub id, or alias (e.g. smollm2-135m)")
    p.add_argument("--dataset", help="gsm8k, arc_challenge, arith, a .jsonl file, or a directory holding {split}.jsonl")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--limit", type=int, help="evaluate only the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=500, help="rationale length cap (paper: 500)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per generate() call, per process")
    p.add_argument("--samples", type=int, default=0, help="K sampled rationales per question for maj@K and pass@K")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --samples (paper: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for --samples (paper: 1.0, i.e. off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for --samples")
    p.add_argument("--no-greedy", action="store_true", help="with --samples: skip the greedy pass")
    p.add_argument("--compile", action="store_true", help="decode with the torch.compile'd fixed-shape step")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights' dtype; auto = bf16 on GPU and on CPUs with native bf16 (AVX512-BF16, AMX), else fp32")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--out", help="results .jsonl (default: runs/eval/<model>-<dataset>-<split>[-k<K>-t<T>].jsonl); "
                                 "a summary .summary.json is written next to it")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out exists (old files kept as .bak)")
    p.add_argument("--compare", nargs=2, metavar=("A.jsonl", "B.jsonl"),
                   help="paired comparison of two result files instead of evaluating")
    args = p.parse_args(argv)
    if args.compare:  # which uses no other flag
        return args
    for broken, error in [
        (not args.model, "--model is required (or use --compare A.jsonl B.jsonl)"),
        (not args.dataset, "--dataset is required (or use --compare A.jsonl B.jsonl)"),
        (args.no_greedy and not args.samples, "--no-greedy needs --samples K (otherwise there is nothing to evaluate)"),
        (args.out and not args.out.endswith(".jsonl"), f"--out must end with .jsonl, got {args.out}"),
    ]:
        if broken:
            raise ValueError(error)
    sampling = {"--temperature": (lambda v: v > 0, "a number > 0 with --samples")} if args.samples else {}
    check_flags(args, {"--limit": POSITIVE, "--max-new-tokens": POSITIVE, "--batch-size": POSITIVE,
                       "--samples": NON_NEGATIVE, "--top-p": UNIT} | sampling)
    return args


def run_settings(args, dtype) -> dict:
    """What must match for a results file to be resumed. Batch size and device are left out: they change no answers
    (up to floating-point noise)."""
    is_file = args.dataset.endswith(".jsonl") or Path(args.dataset).is_file()
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed} if args.samples else {}
    return {"model": args.model, "weights": fingerprint(resolve(args.model)),  # the path may hold other weights later
            "dataset": args.dataset, "split": None if is_file else args.split,
            "max_new_tokens": args.max_new_tokens, "greedy": not args.no_greedy, "samples": args.samples} | sampling \
        | ({"dtype": "bfloat16"} if dtype == torch.bfloat16 else {})  # bf16 changes answers (files before it: fp32)


def default_out(args) -> Path:
    is_file = args.dataset.endswith(".jsonl")
    dataset_name = Path(args.dataset).stem if is_file else Path(args.dataset.rstrip("/")).name
    sampled = f"-k{args.samples}-t{args.temperature:g}" if args.samples else ""
    return Path("runs/eval") / (f"{Path(args.model.rstrip('/')).name}-{dataset_name}"
                                f"{'' if is_file else '-' + args.split}{sampled}.jsonl")


def check_context(model, tokenizer, examples, max_new_tokens) -> None:
    """Every prompt plus max_new_tokens must fit the model's context: generate() allocates a KV cache that long
    before its first step."""
    longest, name = max((len(data.chat_prompt(tokenizer, ex)), ex.id) for ex in examples)
    context = model.args.max_seq_len
    if longest >= context:
        raise ValueError(f"question {name}: its prompt alone ({longest} tokens) does not fit the model's context of "
                         f"{context} tokens (max_position_embeddings), whatever --max-new-tokens; leave it out")
    if longest + max_new_tokens > context:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: the longest prompt ({name}, {longest} tokens) plus "
                         f"{max_new_tokens} new tokens exceeds the model's context of {context} tokens "
                         f"(max_position_embeddings); at most {context - longest} new tokens fit")

if __name__ == "__main__":
    run_main(main)  # under torchrun, ends the process without interpreter finalization
