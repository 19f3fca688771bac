"""GSM8K, ARC-Challenge and `arith`, prepared the way the LaTRO paper uses them.

Every question becomes an `Example`: the zero-shot user message with the chain-of-thought trigger (x), the gold
answer, and the answer template y = "The answer is {gold}." that LaTRO scores as its reward (the caller appends the
model's end-of-turn token). The prompts are the paper's Figures 5 and 6, character for character the official
code's (data_utils.py), wrapped in the model's own chat template (`chat_prompt`):

    GSM8K:  "{question} Let's think step by step."
    ARC:    "Question: {question}\nOptions: {choice texts as a Python list}\nLet's think step by step first then
             print your answer like 'The answer is (one of the options)'."

Where the data comes from (`load_dataset`): a local .jsonl file (or a directory of {split}.jsonl) in either
dataset's layout; else $LATRO_DATA_DIR/{gsm8k,arc_challenge}/{split}.jsonl; else a download cache
($LATRO_CACHE/data, default ~/.cache/latro/data) filled from GSM8K's raw files at a pinned commit (sha256-checked)
or from the Hub's dataset-viewer /rows API for allenai/ai2_arc (JSON rows: no pyarrow needed).

Splits: GSM8K has no validation split, so one is carved from train: GSM8K_VALIDATION questions drawn with a fixed
seed, removed from train. ARC-Challenge ships one. arith's three splits are one seeded stream cut in three.
Departures from the official code: the GSM8K gold has its thousands separators removed ("1,080" -> "1080"), and the
gold rationale (for the SFT baseline) its <<48/2=24>> calculator annotations.
"""

import json
import os
import random
import re
import hashlib
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

GSM8K_TRIGGER = "Let's think step by step."
ARC_TRIGGER = "Let's think step by step first then print your answer like 'The answer is (one of the options)'."

SPLITS = {"gsm8k": ("train", "validation", "test"), "arc_challenge": ("train", "validation", "test"),
          "arith": ("train", "validation", "test")}

GSM8K_COMMIT = "3101c7d5072418e28b9008a6636bde82a006892c"  # openai/grade-school-math, 2021-11-19
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/{commit}/grade_school_math/data/{split}.jsonl"
GSM8K_SHA256 = {
    "train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
}
ARC_ROWS_URL = "https://datasets-server.huggingface.co/rows?{query}"
ARC_SIZES = {"train": 1119, "validation": 299, "test": 1172}
ARC_PAGE = 100  # the most rows the /rows API returns per request
GSM8K_VALIDATION, GSM8K_VALIDATION_SEED = 500, 0  # carved from GSM8K's 7,473 train questions
NUMBER = re.compile(r"-?\d+(\.\d+)?")  # a GSM8K gold answer, once its thousands separators are gone


@dataclass
class Example:
    id: str
    question: str  # the raw question (ARC: the stem, without options)
    prompt_text: str  # the user message: question + chain-of-thought trigger, before the chat template
    answer: str  # gold answer: GSM8K the number after "#### " without commas; ARC the correct option's text
    answer_text: str  # the answer template y, without the end-of-turn token: "The answer is {answer}."
    rationale: str = ""  # GSM8K gold solution (for the SFT baseline); empty for ARC
    choices: list[tuple[str, str]] = field(default_factory=list)  # ARC: (label, text) pairs in the given order
    label: str = ""  # ARC: answerKey, the correct option's label ("A".."E" or "1".."5")

    @property
    def task(self) -> str:
        return "arc_challenge" if self.choices else "gsm8k"


# ---------------------------------------------------------------------------------------------------------------------
# Building examples from records


def gsm8k_example(id: str, question: str, solution: str) -> Example:
    """A GSM8K record: the solution ends with "#### <final answer>"."""
    rationale, answer = solution.split("#### ")  # exactly one marker in every GSM8K solution; checked by the caller
    answer = answer.strip().replace(",", "")
    rationale = re.sub(r"<<[^<>]*>>", "", rationale).strip()  # "48/2 = <<48/2=24>>24" -> "48/2 = 24"
    return Example(
        id=id,
        question=question,
        prompt_text=f"{question} {GSM8K_TRIGGER}",
        answer=answer,
        answer_text=f"The answer is {answer}.",
        rationale=rationale,
    )


def arc_example(id: str, question: str, choices: list[tuple[str, str]], label: str) -> Example:
    """An ARC record. The options are shown as the Python repr of the list of texts, as the official code does."""
    texts = [text for _, text in choices]
    answer = texts[[lab for lab, _ in choices].index(label)]
    return Example(
        id=id,
        question=question,
        prompt_text=f"Question: {question}\nOptions: {texts}\n{ARC_TRIGGER}",
        answer=answer,
        answer_text=f"The answer is {answer}.",
        choices=list(choices),
        label=label,
    )


def detect_layout(record: dict) -> str:
    """Which of the three supported layouts a JSON record is in ("gsm8k", "arc_hf", "arc_ai2"), or "" if none."""
    question = record.get("question")
    if isinstance(question, dict) and "stem" in question:
        return "arc_ai2"  # original AI2 release: {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}
    if "choices" in record:
        return "arc_hf"  # Hugging Face allenai/ai2_arc: {"question", "choices": {"text": [...], "label": [...]}}
    if "answer" in record:
        return "gsm8k"  # {"question", "answer": "...#### 42"}
    return ""


LAYOUT_FIELDS = {
    "gsm8k": '{"question": str, "answer": str ending in "#### <number>"}',
    "arc_hf": '{"id": str, "question": str, "choices": {"text": [str], "label": [str]}, "answerKey": str}',
    "arc_ai2": '{"id": str, "question": {"stem": str, "choices": [{"text": str, "label": str}]}, "answerKey": str}',
}


def example_from_record(record: dict, layout: str, default_id: str) -> Example:
    """Build an Example, raising ValueError (with what was wrong) when the record does not fit its layout."""
    if layout == "gsm8k":
        question, solution = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not isinstance(solution, str) or not question.strip():
            raise ValueError("expected string fields 'question' (not empty) and 'answer'")
        if solution.count("#### ") != 1:
            raise ValueError("expected 'answer' to contain exactly one '#### ' followed by the final answer")
        example = gsm8k_example(str(record.get("id", default_id)), question, solution)
        if not NUMBER.fullmatch(example.answer):
            raise ValueError(f"expected a number after '#### ', got {example.answer!r}")
        return example

    if layout == "arc_hf":
        question, choices = record.get("question"), record.get("choices")
        if not isinstance(choices, dict):
            raise ValueError("expected 'choices' to be an object {\"text\": [...], \"label\": [...]}")
        texts, labels = choices.get("text"), choices.get("label")
    else:  # arc_ai2
        question, choices = record["question"].get("stem"), record["question"].get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise ValueError("expected 'question.choices' to be a list of {\"text\", \"label\"} objects")
        texts, labels = [c.get("text") for c in choices], [c.get("label") for c in choices]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("expected the question to be a non-empty string")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or len(texts) < 2:
        raise ValueError("expected at least two choices, with as many labels as texts")
    if not all(isinstance(t, str) for t in texts + labels):
        raise ValueError("expected choice texts and labels to be strings")
    label = record.get("answerKey")
    if len(set(labels)) != len(labels):
        raise ValueError(f"expected distinct choice labels, got {labels}")
    if label not in labels:
        raise ValueError(f"expected 'answerKey' to be one of the choice labels {labels}, got {label!r}")
    return arc_example(str(record.get("id", default_id)), question, list(zip(labels, texts)), label)


def read_jsonl(path: str | Path, limit: int | None = None) -> list[Example]:
    """Read a .jsonl file in any of the supported layouts; the layout is detected from the first record.

    Questions without an "id" (GSM8K has none) get "{file stem}-{index}", e.g. "test-0", which is stable across
    runs, so evaluation can resume by id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    examples, layout, lines = [], None, {}  # lines: each id's line number
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                 "expected UTF-8 JSON lines") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}); expected one JSON object per line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if layout is None:
                layout = detect_layout(record)
                if not layout:
                    raise ValueError(
                        f"{where}: unrecognised record with fields {sorted(record)}; expected GSM8K "
                        f"{LAYOUT_FIELDS['gsm8k']} or ARC {LAYOUT_FIELDS['arc_hf']} "
                        f"or ARC (AI2 layout) {LAYOUT_FIELDS['arc_ai2']}"
                    )
            elif detect_layout(record) != layout:
                raise ValueError(f"{where}: expected a {layout} record like the first one: {LAYOUT_FIELDS[layout]}")
            try:
                examples.append(example_from_record(record, layout, default_id=f"{path.stem}-{len(examples)}"))
                if examples[-1].id in lines:
                    raise ValueError(f"id {examples[-1].id!r} again (first on line {lines[examples[-1].id]}); "
                                     "expected one record per question")
                lines[examples[-1].id] = line_number
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    if not examples:
        raise ValueError(f"{path}: no examples; expected one JSON object per line")
    return examples


# ---------------------------------------------------------------------------------------------------------------------
# Finding and downloading the named datasets


def cache_dir() -> Path:
    return Path(os.environ.get("LATRO_CACHE", "~/.cache/latro")).expanduser() / "data"


def download_gsm8k(split: str, dest: Path) -> None:
    url = GSM8K_URL.format(commit=GSM8K_COMMIT, split=split)
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read()
    if hashlib.sha256(body).hexdigest() != GSM8K_SHA256[split]:
        raise ValueError(f"{url}: downloaded file does not match the pinned sha256 {GSM8K_SHA256[split]}")
    write_atomic(dest, body)


def download_arc_challenge(split: str, dest: Path) -> None:
    """Page through the Hub's dataset-viewer API and store the rows as jsonl in the Hugging Face layout."""
    lines = []
    while len(lines) < ARC_SIZES[split]:
        query = urllib.parse.urlencode({"dataset": "allenai/ai2_arc", "config": "ARC-Challenge", "split": split,
                                        "offset": len(lines), "length": ARC_PAGE})
        with urllib.request.urlopen(ARC_ROWS_URL.format(query=query), timeout=60) as response:
            page = json.load(response)
        if not page.get("rows"):
            break
        for row in page["rows"]:
            record = row["row"]
            keep = {"id": record["id"], "question": record["question"], "choices": record["choices"]}
            lines.append(json.dumps({**keep, "answerKey": record["answerKey"]}, ensure_ascii=False))
    if len(lines) != ARC_SIZES[split]:
        raise ValueError(f"allenai/ai2_arc ARC-Challenge {split}: got {len(lines)} rows, expected {ARC_SIZES[split]}")
    write_atomic(dest, ("\n".join(lines) + "\n").encode("utf-8"))


def write_atomic(dest: Path, body: bytes) -> None:
    """Write to a temporary file and rename, so an interrupted download never leaves a truncated dataset. The
    temporary name is unique, so concurrent writers (ranks on one machine) never write into each other's file;
    each rename is atomic and the last one wins with a complete file."""
    import tempfile
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a dataset cache is not
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def append_lines(path, lines: list[str]) -> None:
    """Appends whole lines in one write. If it fails (a full disk) the file is cut back to where it was, so a rerun
    never meets a torn record."""
    body = "".join(line + "\n" for line in lines).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            os.ftruncate(fd, size)
            e.filename = e.filename or str(path)
            raise
    finally:
        os.close(fd)


def content_hash(examples: list[Example]) -> str:
    """What a training run's questions are, as a short hash: a resumed run must see the same ones."""
    text = json.dumps([(e.id, e.prompt_text, e.answer, e.rationale) for e in examples])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json(path, obj) -> None:
    """A JSON file written atomically (write_atomic): a crash never leaves half of it."""
    write_atomic(Path(path), (json.dumps(obj, indent=2) + "\n").encode())


def read_jsonl_rows(path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) for each line of a .jsonl file that a run appends to (eval.py's results, train.py's
    metrics). A last line cut off mid-write (no newline, not JSON) is dropped; a bad line elsewhere is an error."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            if line.strip():
                rows.append((number, json.loads(line)))
        except json.JSONDecodeError:
            if number < len(lines):  # not the torn last line of an interrupted run
                raise ValueError(f"{path}:{number}: not valid JSON; expected one {what} per line") from None
    return rows


def split_file(name_or_path: str, split: str) -> Path:
    """The local .jsonl file holding `split` of a named dataset or path, downloading it into the cache if needed."""
    if name_or_path not in SPLITS:
        path = Path(name_or_path).expanduser()
        if name_or_path.endswith(".jsonl") or path.is_file():
            return path
        if path.is_dir():
            return path / f"{split}.jsonl"
        raise ValueError(
            f"unknown dataset {name_or_path!r}: expected one of {', '.join(SPLITS)}, a .jsonl file, "
            "or a directory holding {split}.jsonl"
        )
    if split not in SPLITS[name_or_path]:
        raise ValueError(f"{name_or_path} has no split {split!r}: expected one of {', '.join(SPLITS[name_or_path])}")
    if name_or_path == "gsm8k" and split == "validation":
        split = "train"  # carved from it (load_dataset)

    if os.environ.get("LATRO_DATA_DIR"):
        local = Path(os.environ["LATRO_DATA_DIR"]).expanduser() / name_or_path / f"{split}.jsonl"
        if local.is_file():
            return local
    cached = cache_dir() / name_or_path / f"{split}.jsonl"
    if cached.is_file():
        return cached
    download = download_gsm8k if name_or_path == "gsm8k" else download_arc_challenge
    print(f"downloading {name_or_path} {split} into {cached}")
    try:
        download(split, cached)
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors
        raise FileNotFoundError(
            f"{name_or_path} {split}: download failed ({e}); without network, put the file at "
            f"$LATRO_DATA_DIR/{name_or_path}/{split}.jsonl or pass a .jsonl path"
        ) from None
    return cached


def load_dataset(name_or_path: str, split: str = "train", limit: int | None = None) -> list[Example]:
    """Examples of `split` of "gsm8k", "arc_challenge", a .jsonl file, or a directory holding {split}.jsonl.

    A .jsonl file is read as is (`split` is ignored). `limit` keeps the first N questions, in file order.
    A named dataset whose file holds the other dataset's layout is refused: the name would pick the wrong beta.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of questions, got {limit}")
    if name_or_path == "arith":
        return arith_examples(split)[:limit]
    path = split_file(name_or_path, split)
    carve = name_or_path == "gsm8k" and split != "test"
    examples = read_jsonl(path, limit=None if carve else limit)
    if carve:  # GSM8K's validation split: fixed questions of its train file, which train then leaves out
        held = set(random.Random(GSM8K_VALIDATION_SEED).sample(range(len(examples)), GSM8K_VALIDATION))
        examples = [e for i, e in enumerate(examples) if (i in held) == (split == "validation")][:limit]
    found = examples[0].task
    if name_or_path in SPLITS and found != name_or_path:
        raise ValueError(f"--dataset {name_or_path}: {path} holds {found}-layout records, not {name_or_path}; "
                         "pass the .jsonl path itself as --dataset to use it as what it is")
    return examples


def detect_task(name_or_path: str, split: str = "train") -> str:
    """"gsm8k" or "arc_challenge": the name itself, or for a local file the layout of its first record (read
    without downloading anything). Falls back to "gsm8k" when the file cannot be read; load_dataset reports why."""
    if name_or_path in SPLITS:
        return "gsm8k" if name_or_path == "arith" else name_or_path  # arith is in the GSM8K layout
    try:
        with open(split_file(name_or_path, split), encoding="utf-8") as f:
            first = next(line for line in f if line.strip())
        layout = detect_layout(json.loads(first))
    except (OSError, ValueError, StopIteration, AttributeError):
        return "gsm8k"
    return "arc_challenge" if layout.startswith("arc") else "gsm8k"


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


def plain_prompt_text(example: Example) -> str:
    """The official code's prompt for models without a chat template (base models)."""
    if example.task == "arc_challenge":
        texts = [text for _, text in example.choices]
        return f"Question: {example.question}\nOptions: {texts}\nAnswer: {GSM8K_TRIGGER}"
    return f"{example.question}\n{GSM8K_TRIGGER}"


def chat_prompt_text(tokenizer, example: Example) -> str:
    """The text the model sees: the user message in the model's chat template, ending with the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        return plain_prompt_text(example)
    messages = [{"role": "user", "content": example.prompt_text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def chat_prompt(tokenizer, example: Example) -> list[int]:
    """Token ids of the prompt x. The tokenizer adds BOS unless the rendered template already starts with it."""
    return tokenizer.encode(chat_prompt_text(tokenizer, example), add_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------------------
# A synthetic task for laptop-scale runs


# One seeded stream of distinct questions, cut in this order (validation last, so train and test are the same
# questions they were before the split existed).
ARITH_SIZES = {"train": 2000, "test": 500, "validation": 500}
NAMES = ("Ava", "Ben", "Cleo", "Dev", "Ema", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena", "Milo", "Nora")
ITEMS = ("apples", "marbles", "stickers", "pencils", "coins", "shells", "cards", "books", "eggs", "stamps")
TIMES = {2: "doubles", 3: "triples"}


def arith_examples(split: str, seed: int = 1234) -> list[Example]:
    """`arith`: one- to three-step word problems (+, -, x) in the GSM8K layout, generated from a fixed seed.

    It exists so that a laptop can check that LaTRO teaches a small model to *answer* (SmolLM2-135M-Instruct gets
    a minority of these right greedily, often computing the answer and then rambling on), not as a benchmark. Train,
    test and validation are one seeded stream of distinct questions cut in three, so they never overlap.

        Ava has 7 marbles. She buys 5 more marbles. Then she gives away 3 marbles. How many marbles does Ava have now?
        Ava starts with 7. 7 + 5 = 12. 12 - 3 = 9. #### 9
    """
    if split not in ARITH_SIZES:
        raise ValueError(f"arith has no split {split!r}: expected one of {', '.join(ARITH_SIZES)}")
    rng, seen, records = random.Random(seed), set(), []
    while len(records) < sum(ARITH_SIZES.values()):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        pronoun = "She" if name in ("Ava", "Cleo", "Ema", "Hana", "Jade", "Lena", "Nora") else "He"
        value = rng.randint(2, 12)
        sentences, steps = [f"{name} has {value} {item}."], [f"{name} starts with {value}."]
        for _ in range(rng.randint(1, 3)):
            op = rng.choice("+-x")
            if op == "+":
                b = rng.randint(2, 9)
                sentences.append(f"{pronoun} buys {b} more {item}.")
                steps.append(f"{value} + {b} = {value + b}.")
                value += b
            elif op == "-" and value > 2:
                b = rng.randint(1, value - 1)
                sentences.append(f"{pronoun} gives away {b} {item}.")
                steps.append(f"{value} - {b} = {value - b}.")
                value -= b
            elif op == "x" and value <= 15:
                k = rng.choice(list(TIMES))
                sentences.append(f"{pronoun} {TIMES[k]} the number of {item} {pronoun.lower()} has.")
                steps.append(f"{value} x {k} = {value * k}.")
                value *= k
        if len(sentences) == 1:
            continue
        question = " ".join(sentences[:1] + [sentences[1]] + [f"Then {s[0].lower()}{s[1:]}" for s in sentences[2:]])
        question += f" How many {item} does {name} have now?"
        if question in seen:
            continue
        seen.add(question)
        records.append(gsm8k_example(f"arith-{len(records)}", question, " ".join(steps) + f" #### {value}"))
    start = 0
    for name, size in ARITH_SIZES.items():
        if name == split:
            return records[start:start + size]
        start += size
