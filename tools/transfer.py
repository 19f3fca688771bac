"""A transfer test set: arithmetic word problems worded unlike the `arith` training generator.

    python tools/transfer.py runs/transfer.jsonl              # 200 two- and three-step problems, GSM8K layout
    python tools/transfer.py runs/transfer1.jsonl --one-step   # 200 one-step problems
    # then: python eval.py --model CKPT --dataset runs/transfer.jsonl

Its templates were written independently of data.arith_examples, with other verbs, sentence shapes, names, items,
units, number ranges and question wording. Nothing is trained or tuned on it: a gain that holds on `arith`'s test
split but not here is a gain in format, not in reasoning. The default set (numbers mostly 10-200, two or three
steps) is harder than `arith`; SmolLM2-135M-Instruct scores 1 of 200 on it, so the one-step set (numbers 2-40)
exists to measure transfer above that floor. Each template returns (question, steps); a step is (a, op, b), the
answer is the last step's result, and record i comes from templates[i % 10].
"""
import json
import os
import random
import sys

NAMES = ["Priya", "Omar", "Sofia", "Lucas", "Rosa", "Tariq", "Yuki", "Mateo",
         "Zara", "Elif", "Jonah", "Amara", "Diego", "Wren", "Farah", "Theo"]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def bakery(r):
    boxes, each, item = r.randint(3, 12), r.randint(6, 15), r.choice(["muffins", "bagels", "cupcakes"])
    sold = r.randint(10, boxes * each - 5)
    return (f"A bakery packs {boxes} boxes with {each} {item} in each box. It sells {sold} of the {item}. "
            f"How many {item} are left?"), [(boxes, "*", each), (boxes * each, "-", sold)]


def shopping(r):
    n, a = r.choice(NAMES), r.randint(60, 200)
    b = r.randint(10, a // 2)
    c = r.randint(5, a - b)
    question = f"{n} has ${a}. {n} spends ${b} on a jacket and ${c} on a scarf. How much money is left?"
    return question, [(a, "-", b), (a - b, "-", c)]


def reading(r):
    n, p, k = r.choice(NAMES), r.randint(10, 80), r.randint(5, 40)
    return (f"On Monday {n} read {p} pages of a novel. On Tuesday {n} read {k} more pages than on Monday. "
            f"What is the total number of pages {n} read on the two days?"), [(p, "+", k), (p, "+", p + k)]


def recycling(r):
    a, item = r.randint(10, 90), r.choice(["cans", "bottles", "jars"])
    return (f"Team Red collected {a} {item} for recycling. Team Blue collected twice as many {item} as "
            f"Team Red. In all, how many {item} did the two teams collect?"), [(a, "*", 2), (a, "+", 2 * a)]


def crayons(r):
    n, g, each, extra = r.choice(NAMES), r.randint(3, 8), r.randint(4, 20), r.randint(2, 15)
    question = (f"{n} shares {g * each} crayons equally among {g} friends. Later, each friend receives "
                f"{extra} more crayons from the teacher. How many crayons does each friend end up with?")
    return question, [(g * each, "/", g), (each, "+", extra)]


def cycling(r):
    n, per, days = r.choice(NAMES), r.randint(3, 12), r.randint(3, 9)
    goal = per * days + r.randint(5, 60)
    return (f"{n} plans to cycle {goal} kilometers this month and cycles {per} kilometers a day for {days} "
            f"days. How many kilometers remain to reach the goal?"), [(per, "*", days), (goal, "-", per * days)]


def practice(r):
    n, m, d, e = r.choice(NAMES), r.randint(15, 45), r.randint(3, 6), r.randint(10, 60)
    return (f"{n} practices the piano for {m} minutes on each of {d} weekdays, plus {e} minutes on "
            f"Saturday. How many minutes does {n} practice in all?"), [(m, "*", d), (m * d, "+", e)]


def tank(r):
    b, w = r.randint(3, 9), r.randint(4, 12)
    total = b * w + r.randint(10, 120)
    return (f"A water tank holds {total} liters. A farmer fills {b} buckets with {w} liters each from the "
            f"tank. How many liters remain in the tank?"), [(b, "*", w), (total, "-", b * w)]


def wages(r):
    n, rate, jars = r.choice(NAMES), r.randint(8, 20), r.randint(2, 4)
    hours = jars * r.randint(2, 4)
    return (f"{n} earns ${rate} per hour and works {hours} hours. {n} splits the earnings equally into "
            f"{jars} jars. How many dollars go into each jar?"), [(rate, "*", hours), (rate * hours, "/", jars)]


def berries(r):
    n1, n2, n3 = r.sample(NAMES, 3)
    a, b = r.randint(20, 90), r.randint(20, 90)
    c = r.randint(5, b - 5)
    question = (f"{n1} picks {a} strawberries and {n2} picks {b}. {n3} picks {c} fewer strawberries than "
                f"{n2}. How many strawberries did the three friends pick altogether?")
    return question, [(b, "-", c), (a, "+", b), (a + b, "+", b - c)]


TEMPLATES = [bakery, shopping, reading, recycling, crayons, cycling, practice, tank, wages, berries]


# One step each: the same arithmetic as arith's easier questions, in sentences arith never uses.
def tulips(r):
    a, b = r.randint(2, 9), r.randint(2, 9)
    return (f"A gardener plants {a} rows of tulips with {b} tulips in each row. How many tulips are planted "
            f"in total?"), [(a, "*", b)]


def bus(r):
    a = r.randint(10, 40)
    b = r.randint(2, a - 2)
    return (f"There are {a} passengers on a bus. At the next stop, {b} passengers get off. How many passengers "
            f"are still on the bus?"), [(a, "-", b)]


def library(r):
    a, b = r.randint(5, 40), r.randint(5, 40)
    return (f"The school library lent out {a} books in the morning and {b} books in the afternoon. How many "
            f"books did it lend out that day?"), [(a, "+", b)]


def pizza(r):
    n, plates, each = r.choice(NAMES), r.randint(2, 6), r.randint(2, 8)
    return (f"{n} cuts {plates * each} slices of pizza and shares them equally among {plates} plates. How many "
            f"slices are on each plate?"), [(plates * each, "/", plates)]


def batteries(r):
    a, b = r.randint(2, 12), r.randint(2, 6)
    return f"A pack holds {a} batteries. How many batteries are in {b} packs?", [(a, "*", b)]


def temperature(r):
    a, b = r.randint(2, 25), r.randint(2, 15)
    return (f"In the morning the temperature was {a} degrees. By noon it had risen by {b} degrees. What was the "
            f"temperature at noon?"), [(a, "+", b)]


def coins(r):
    n, a = r.choice(NAMES), r.randint(10, 40)
    b = r.randint(2, a - 2)
    return (f"A jar contains {a} coins. {n} takes out {b} coins to pay for a snack. How many coins stay in the "
            f"jar?"), [(a, "-", b)]


def laps(r):
    n, a, b = r.choice(NAMES), r.randint(2, 20), r.randint(2, 20)
    return f"{n} ran {a} laps on Saturday and {b} laps on Sunday. How many laps did {n} run over the weekend?", \
        [(a, "+", b)]


def chairs(r):
    a, b = r.randint(3, 9), r.randint(3, 9)
    return (f"A hall has {a} rows of chairs, and each row seats {b} people. How many people can be seated in "
            f"the hall?"), [(a, "*", b)]


def eggs(r):
    cartons, size = r.randint(2, 8), r.choice([4, 6, 10, 12])
    return (f"A farmer collected {cartons * size} eggs and packs them into cartons of {size}. How many cartons "
            f"does the farmer fill?"), [(cartons * size, "/", size)]


ONE_STEP = [tulips, bus, library, pizza, batteries, temperature, coins, laps, chairs, eggs]


def solve(steps):
    """Write each step as "a op b = c." and return (text, last result)."""
    parts = []
    for a, op, b in steps:
        assert op != "/" or a % b == 0, "division must be exact"
        c = OPS[op](a, b)
        assert c >= 0, "results must be non-negative"
        parts.append(f"{a} {op} {b} = {c}.")
    return " ".join(parts), c


def transfer_records(n: int = 200, seed: int = 2024, one_step: bool = False) -> list[dict]:
    """n distinct problems, deterministic for a seed: [{"question": str, "answer": "<worked steps> #### <int>"}]"""
    rng, templates = random.Random(seed), ONE_STEP if one_step else TEMPLATES
    prefix = "transfer1" if one_step else "transfer"
    out, seen = [], set()
    while len(out) < n:
        question, steps = templates[len(out) % len(templates)](rng)
        if question not in seen:  # a duplicate is redrawn from the same template
            seen.add(question)
            text, answer = solve(steps)
            out.append({"id": f"{prefix}-{len(out)}", "question": question, "answer": f"{text} #### {answer}"})
    return out


if __name__ == "__main__":
    one_step = sys.argv[2:] == ["--one-step"]
    if len(sys.argv) - one_step != 2 or not sys.argv[1].endswith(".jsonl"):
        sys.exit("usage: python tools/transfer.py OUT.jsonl [--one-step]")
    os.makedirs(os.path.dirname(os.path.abspath(sys.argv[1])), exist_ok=True)
    with open(sys.argv[1], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in transfer_records(one_step=one_step))
