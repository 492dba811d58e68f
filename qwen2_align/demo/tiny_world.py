"""The demo's tiny world: what its base model is pretrained on and what its stages and evaluation ask about.

A model small enough to pretrain in minutes on two CPU cores knows only what it was shown, so the project writes
its world: sums of numbers up to `max_operand`, word problems, short Python functions with their tests, simple
facts, text under constraints (upper case, a number of words), characters and the principles of a constitution.
The pretraining corpus (`pretrain.jsonl`, text rows) states these as prose and code, plus chat conversations:
facts, constraints, code, sums asked in other words (`OTHER_SUM_QUESTIONS`), the synthesis stages' own teacher
prompts with right answers (`CHAT_SKILLS`: tagging, judging, rewriting, following or violating a principle,
repurposing, role-play), so that the base model can be the teacher of every stage, and, rarely
(`contract_share`), the evaluation's question `What is {a} + {b}?` about a training pair. The base model thus
knows the chat format, the facts and the sums, and seldom answers the question right: answering it in the format,
with the sum, for any pair, is what alignment has to teach. Measured (AMD EPYC, 2 cores; `make world pretrain`,
4 min 40 s in float32): greedy, the base model answers none of the 100 held-out questions right (it writes
`a + b = s.` but miscopies the operands); sampled, 44% of the training problems within 32 samples. Without the rare questions it answered 1 in 100,
rejection sampling kept 48 answers to 900 problems, mostly text whose last number happened to be the sum, and SFT
on them reached 2%. The sums themselves are learned late (a world of sums up to 9 with 6,000 documents completed
4 of 30 held-out sums right, with 10,000 all 30).

Held out: `eval_pairs` ordered (a, b) pairs. The corpus states their sums like any other (knowledge comes from
pretraining), but no chat and no post-training input asks about them, so `eval/arithmetic.jsonl` asks questions
no stage trained on. Everything is drawn from a seeded RNG: the same settings write the same bytes, which is what the
pretrain stage's cache is keyed by.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from alignment.data import write_rows
from alignment.tokenizer import qwen2_tokenizer
from data_synthesis.annotate import judge_prompt
from data_synthesis.constitution import DEFAULT_CONSTITUTION, FOLLOW_SYSTEM, VIOLATE_SYSTEM, load_constitution
from data_synthesis.evolve import depth_prompt
from data_synthesis.instag import TAG_PROMPT
from data_synthesis.repurpose import DETAIL_TEMPLATES, OPENING_TEMPLATE

from .arithmetic import question

SUM_SENTENCES = ("{a} plus {b} is {s}.", "The sum of {a} and {b} is {s}.", "Adding {a} and {b} gives {s}.",
                 "{a} and {b} make {s}.", "If you add {b} to {a}, you get {s}.")
WORD_PROBLEMS = ("{name} has {a} {thing}. {name} gets {b} more. Now {name} has {s} {thing}.",
                 "There are {a} {thing} in a box and {b} {thing} on the table: {s} {thing} in all.",
                 "{name} read {a} pages on Monday and {b} pages on Tuesday, {s} pages in two days.")
NAMES = ("Tom", "Ana", "Li", "Sara", "Omar", "Kim", "Ben", "Mia")
THINGS = ("apples", "books", "coins", "cards", "stones", "pens", "cups", "shells")
FACTS = (("What colour is the sky?", "The sky is blue."), ("What colour is grass?", "Grass is green."),
         ("What colour is snow?", "Snow is white."), ("What does a cat say?", "A cat says meow."),
         ("What does a dog say?", "A dog says woof."), ("Where does the sun rise?", "The sun rises in the east."),
         ("How many days are in a week?", "A week has 7 days."), ("How many legs does a spider have?",
                                                                  "A spider has 8 legs."),
         ("What do bees make?", "Bees make honey."), ("What is ice made of?", "Ice is frozen water."),
         ("What is the capital of France?", "The capital of France is Paris."),
         ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
         ("What do plants need to grow?", "Plants need light and water to grow."),
         ("How many months are in a year?", "A year has 12 months."),
         ("What is the opposite of hot?", "The opposite of hot is cold."),
         ("What is the opposite of up?", "The opposite of up is down."))
# (signature, what it does, body, tests)
FUNCTIONS = (("add(a, b)", "returns the sum of a and b", "return a + b", "assert add(2, 3) == 5\nassert add(0, 7) == 7"),
             ("is_even(n)", "returns True when n is even", "return n % 2 == 0",
              "assert is_even(4)\nassert not is_even(7)"),
             ("square(n)", "returns n times n", "return n * n", "assert square(3) == 9\nassert square(0) == 0"),
             ("maximum(a, b)", "returns the larger of a and b", "return a if a > b else b",
              "assert maximum(2, 9) == 9\nassert maximum(5, 1) == 5"),
             ("reverse(text)", "returns the text backwards", "return text[::-1]",
              "assert reverse('abc') == 'cba'\nassert reverse('') == ''"),
             ("double(n)", "returns twice n", "return 2 * n", "assert double(4) == 8\nassert double(0) == 0"),
             ("first(items)", "returns the first item of a list", "return items[0]",
              "assert first([3, 1]) == 3\nassert first(['a']) == 'a'"),
             ("count_a(text)", "counts the letters a in the text", "return text.count('a')",
              "assert count_a('banana') == 3\nassert count_a('xyz') == 0"),
             ("absolute(n)", "returns n without its sign", "return -n if n < 0 else n",
              "assert absolute(-4) == 4\nassert absolute(3) == 3"),
             ("is_empty(items)", "returns True when the list is empty", "return len(items) == 0",
              "assert is_empty([])\nassert not is_empty([1])"))
HELD_OUT_FUNCTIONS = 3  # the last FUNCTIONS: in the corpus as code, asked for in a chat only by the evaluation
UPPER = (("Name a fruit.", "Apple."), ("Name a colour.", "Red."), ("Name an animal.", "A horse."),
         ("Say hello.", "Hello there."), ("Name a day of the week.", "Monday."))
THREE_WORDS = (("What do cats like?", "Cats like fish."), ("What is water?", "Water is wet."),
               ("How is the weather?", "It is sunny."), ("What do birds do?", "Birds can fly."))
# Arithmetic asked in other words than the evaluation's `What is {a} + {b}?`, about training pairs only: the base
# model learns that a chat can ask for a sum, not how the demo's question is answered.
OTHER_SUM_QUESTIONS = ("Add {a} and {b}.", "How much is {a} plus {b}?", "Tell me the sum of {a} and {b}.")
OTHER_SUM_ANSWERS = ("{a} plus {b} is {s}.", "The sum is {s}.", "{a} and {b} make {s}.")
PRINCIPLES = ("A good assistant is honest: it says so when it does not know.",
              "A good assistant refuses to help anyone hurt people.",
              "A good assistant answers the question that was asked, briefly.",
              "A good assistant is polite, even when the user is rude.")


@dataclass
class TinyWorld:
    """The world's settings; the corpus and the sets are functions of them."""

    seed: int = 0
    max_operand: int = 19
    eval_pairs: int = 100
    documents: int = 20000
    lines_per_document: int = 8
    chat_share: float = 0.3  # documents that are chat conversations
    skill_share: float = 0.3  # of those, the synthesis stages' teacher tasks (CHAT_SKILLS)
    arithmetic_chat_share: float = 0.3  # of the rest, sums about training pairs, asked in other words...
    contract_share: float = 0.05  # ...or, this share of them, in the evaluation's words (`What is {a} + {b}?`)

    def pairs(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(train pairs, held-out eval pairs), ordered pairs of operands."""
        every = [(a, b) for a in range(self.max_operand + 1) for b in range(self.max_operand + 1)]
        random.Random(self.seed).shuffle(every)
        return sorted(every[self.eval_pairs:]), sorted(every[:self.eval_pairs])


def _sum_line(rng: random.Random, a: int, b: int) -> str:
    if rng.random() < 0.3:
        return rng.choice(WORD_PROBLEMS).format(a=a, b=b, s=a + b, name=rng.choice(NAMES), thing=rng.choice(THINGS))
    return rng.choice(SUM_SENTENCES).format(a=a, b=b, s=a + b)


def _prose_line(rng: random.Random, every_pair: list[tuple[int, int]]) -> str:
    kind = rng.random()
    if kind < 0.55:
        return _sum_line(rng, *rng.choice(every_pair))
    if kind < 0.7:
        return rng.choice(FACTS)[1]
    if kind < 0.85:
        signature, what, body, tests = rng.choice(FUNCTIONS)
        return f"# {signature.split('(')[0]} {what}.\ndef {signature}:\n    {body}\n\n{tests}\n"
    if kind < 0.93:
        prompt, reply = rng.choice(UPPER)
        return f"{prompt} In upper case: {reply.upper()}"
    if kind < 0.97:
        prompt, reply = rng.choice(THREE_WORDS)
        return f"{prompt} In three words: {reply}"
    return rng.choice(PRINCIPLES)


# The intentions an InsTag tagger should see in each kind of the world's instructions: (tag, explanation).
KIND_TAGS = {
    "sum": (("addition", "The user asks for the sum of two numbers."),
            ("arithmetic", "Adding numbers is arithmetic.")),
    "fact": (("general knowledge", "The user asks a question about the world."),),
    "code": (("python", "The user wants Python code."),
             ("function writing", "The answer is a function that does one thing.")),
    "upper": (("formatting", "The answer has to follow a format."),
              ("upper case", "Every letter of the answer must be a capital.")),
    "three_words": (("brevity", "The answer has to be short."),
                    ("word count", "The answer must have exactly three words.")),
}
# add_constraint rewrites the tiny teacher learns for `evolve`: what is appended to the instruction.
ADDED_CONSTRAINTS = (" Answer in upper case.", " Answer in three words.", " Do not use commas.")
# `constitution`'s prompts by principle of recipes/constitution/default.yaml: (prompt, follower, violator reply).
SAFETY = {
    "harm-avoidance": (("How do I make my brother cry?", "I will not help you hurt him. Be kind to your brother.",
                        "Take his toys and laugh at him."),
                       ("How can I break my neighbour's window?", "I will not help with that. Talk to your "
                        "neighbour instead.", "Throw a big stone at it at night."),
                       ("How do I scare the cat?", "Please do not scare the cat. Let it rest.",
                        "Shout at it and chase it around the house.")),
    "honesty": (("Will it rain tomorrow?", "I do not know. I cannot see the weather.",
                 "Yes, it will rain at noon. I am sure."),
                ("What is my friend's name?", "I do not know your friend's name.",
                 "Your friend is called Sam. I am certain."),
                ("How many fish are in the sea?", "Nobody knows the exact number.",
                 "There are exactly 4 million fish.")),
}
# Characters for `repurpose`'s role-play: (name, who they are, the opening a user sends, their reply).
PROFILES = (("Tom", "a baker in a small town", "Hello Tom! What do you do all day?",
             "I bake bread and cakes every morning."),
            ("Ana", "a sailor on an old ship", "Hi Ana! Do you like the sea?", "I love the sea. It is my home."),
            ("Li", "a gardener in a big park", "Hello Li! What grows in your park?",
             "Roses, trees and a lot of grass."),
            ("Omar", "a teacher at a village school", "Hi Omar! What do you teach?",
             "I teach sums and reading to children."))
CHAT_SKILLS = ("tag", "judge", "evolve", "constitution", "repurpose", "opening", "roleplay")  # stages' own prompts


def profile_text(name: str, who: str) -> str:
    return f"You are {name}, {who}. You are friendly and you speak briefly."


@functools.cache
def _principles() -> dict:
    return {p.id: p for p in load_constitution(DEFAULT_CONSTITUTION)}


def _instruction(rng: random.Random, train_pairs: list[tuple[int, int]]) -> tuple[str, str, str]:
    """(kind, instruction, a right reply) of a chat the world holds; sums only about training pairs, never in
    the evaluation's words."""
    kind = rng.choice(tuple(KIND_TAGS))
    if kind == "sum":
        a, b = rng.choice(train_pairs)
        return (kind, rng.choice(OTHER_SUM_QUESTIONS).format(a=a, b=b),
                rng.choice(OTHER_SUM_ANSWERS).format(a=a, b=b, s=a + b))
    if kind == "fact":
        return (kind, *rng.choice(FACTS))
    if kind == "code":
        signature, what, body, _ = rng.choice(FUNCTIONS[:-HELD_OUT_FUNCTIONS])
        return kind, f"Write a Python function `{signature}` that {what}.", f"def {signature}:\n    {body}"
    if kind == "upper":
        prompt, reply = rng.choice(UPPER)
        return kind, f"{prompt} Answer in upper case.", reply.upper()
    prompt, reply = rng.choice(THREE_WORDS)
    return kind, f"{prompt} Answer in three words.", reply


def _skill_turn(rng: random.Random, skill: str, train_pairs: list[tuple[int, int]]) -> tuple[str | None, str, str]:
    """A teacher task of a synthesis stage, asked with that stage's own prompt: (system message or None for the
    default one, user turn, the right answer)."""
    if skill == "tag":
        kind, instruction, _ = _instruction(rng, train_pairs)
        tags = [{"tag": tag, "explanation": why} for tag, why in KIND_TAGS[kind]]
        return None, TAG_PROMPT.format(query=instruction), json.dumps(tags)
    if skill == "evolve":
        kind, instruction, _ = _instruction(rng, train_pairs)
        added = rng.choice([c for c in ADDED_CONSTRAINTS if c.strip().rstrip(".") not in instruction])
        return None, depth_prompt("add_constraint", instruction, 20), instruction + added
    if skill == "constitution":  # as a system message, the principle to keep or the flaw to show
        principle, (prompt, follower, violator) = rng.choice([(p, case) for p, cases in SAFETY.items()
                                                              for case in cases])
        if rng.random() < 0.5:
            return FOLLOW_SYSTEM.format(follow=_principles()[principle].follow), prompt, follower
        return VIOLATE_SYSTEM.format(violate=_principles()[principle].violate), prompt, violator
    if skill == "repurpose":  # a fact's sentence -> the question it answers
        question, answer = rng.choice(FACTS)
        level = rng.choice(tuple(DETAIL_TEMPLATES))
        asked = {"brief": question, "detailed": f"{question} Answer in one full sentence.",
                 "very_detailed": f"{question} Answer in one full sentence, plainly and without a list."}[level]
        return None, DETAIL_TEMPLATES[level].replace("{text}", answer), asked
    if skill in ("opening", "roleplay"):
        name, who, opening, reply = rng.choice(PROFILES)
        if skill == "opening":
            return None, OPENING_TEMPLATE.replace("{profile}", profile_text(name, who)), opening
        return profile_text(name, who), opening, reply
    a, b = rng.choice(train_pairs)  # judge: sums right (9) and wrong (2), in any order
    prompt = [{"role": "user", "content": rng.choice(OTHER_SUM_QUESTIONS).format(a=a, b=b)}]
    sums = [a + b, a + b + rng.choice((-3, -2, -1, 1, 2, 3)), a + b + rng.choice((-10, 4, 5, 10))]
    chosen = rng.sample(sums[:2] + [sums[rng.randrange(3)]], rng.choice((2, 3)))
    replies = [rng.choice(OTHER_SUM_ANSWERS).format(a=a, b=b, s=s) for s in chosen]
    scores = [9 if s == a + b else 2 for s in chosen]
    return None, judge_prompt(prompt, replies)[0]["content"], json.dumps({"scores": scores})


def _chat(rng: random.Random, world: TinyWorld, train_pairs: list[tuple[int, int]]) -> list[dict]:
    system = None
    if rng.random() < world.skill_share:
        system, prompt, reply = _skill_turn(rng, rng.choice(CHAT_SKILLS), train_pairs)
    elif rng.random() < world.arithmetic_chat_share:
        a, b = rng.choice(train_pairs)
        if rng.random() < world.contract_share:  # the evaluation's question, rarely, about training pairs
            prompt, reply = question(a, b)[0]["content"], f"{a} + {b} = {a + b}."
        else:
            prompt = rng.choice(OTHER_SUM_QUESTIONS).format(a=a, b=b)
            reply = rng.choice(OTHER_SUM_ANSWERS).format(a=a, b=b, s=a + b)
    else:
        _, prompt, reply = _instruction(rng, train_pairs)
    return [{"role": "system", "content": system or "You are a helpful assistant."},
            {"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def pretraining_corpus(world: TinyWorld) -> list[dict]:
    """Text rows: prose documents of `lines_per_document` lines, and chat conversations."""
    rng = random.Random(world.seed + 1)
    train, held_out = world.pairs()
    every_pair = train + held_out
    chat_template = qwen2_tokenizer()  # conversations as the ChatML text the models will be prompted with
    rows = []
    for i in range(world.documents):
        if rng.random() < world.chat_share:
            text = chat_template.apply_chat_template(_chat(rng, world, train), tokenize=False)
        else:
            text = "\n".join(_prose_line(rng, every_pair) for _ in range(world.lines_per_document))
        rows.append({"id": f"world-{i:05d}", "text": text, "source": "tiny_world", "meta": {}})
    return rows


def arithmetic_eval(world: TinyWorld) -> list[dict]:
    """The held-out questions, in the evaluation's contract: `What is {a} + {b}?`, answer in meta."""
    return [{"id": f"eval-add-{a}-{b}", "messages": question(a, b), "source": "tiny_world",
             "meta": {"a": a, "b": b, "answer": str(a + b)}} for a, b in world.pairs()[1]]


EVAL_CONSTRAINTS = ([{"kind": "capitals"}], [{"kind": "lowercase"}], [{"kind": "no_commas"}],
                    [{"kind": "number_words", "relation": "at most", "num_words": 5}])


def _prompt_row(row_id: str, content: str, **meta: object) -> dict:
    return {"id": row_id, "messages": [{"role": "user", "content": content}], "source": "tiny_world", "meta": meta}


def code_tasks(functions: tuple) -> list[dict]:
    """Prompt rows asking for a function, its asserts in `meta.tests` (the `execution` stage's format)."""
    return [_prompt_row(f"code-{signature.split('(')[0]}", f"Write a Python function `{signature}` that {what}.",
                        tests=tests + "\n") for signature, what, _, tests in functions]


def math_problems(world: TinyWorld, copies: int = 3) -> list[dict]:
    """`What is {a} + {b}?` about the training pairs only, `copies` rows each, reference in `meta.answer`."""
    return [_prompt_row(f"math-{a}-{b}-{k}", question(a, b)[0]["content"], a=a, b=b, answer=str(a + b))
            for k in range(copies) for a, b in world.pairs()[0]]


def base_text(world: TinyWorld, documents: int = 200) -> list[dict]:
    """Prose documents drawn like the corpus's (another seed): the perplexity of the alignment tax."""
    rng = random.Random(world.seed + 2)
    every_pair = [pair for pairs in world.pairs() for pair in pairs]
    return [{"id": f"base-text-{i:04d}", "text": "\n".join(_prose_line(rng, every_pair)
                                                          for _ in range(world.lines_per_document)),
             "source": "tiny_world", "meta": {}} for i in range(documents)]


def instructions(world: TinyWorld, sums: int = 20) -> list[dict]:
    """The world's kinds of instruction, for `instag` to tag: every fact, training function, constraint prompt,
    and `sums` sums asked in other words (training pairs)."""
    rng = random.Random(world.seed + 3)
    train = world.pairs()[0]
    asked = [question for question, _ in FACTS]
    asked += [f"Write a Python function `{signature}` that {what}."
              for signature, what, _, _ in FUNCTIONS[:-HELD_OUT_FUNCTIONS]]
    asked += [f"{prompt} Answer in upper case." for prompt, _ in UPPER]
    asked += [f"{prompt} Answer in three words." for prompt, _ in THREE_WORDS]
    asked += [rng.choice(OTHER_SUM_QUESTIONS).format(a=a, b=b) for a, b in rng.sample(train, sums)]
    return [_prompt_row(f"instruction-{i:03d}", text) for i, text in enumerate(asked)]


def write_world(world: TinyWorld, out: str | Path) -> dict[str, Path]:
    """Write the corpus, the evaluation sets (`eval/`) and the inputs of the synthesis stages (`inputs/`), none
    of which asks what an evaluation set asks; returns their paths by name."""
    out = Path(out)
    facts = [question for question, _ in FACTS]
    sets = {
        "pretrain": pretraining_corpus(world),
        "eval/arithmetic": arithmetic_eval(world),
        "eval/code": code_tasks(FUNCTIONS[-HELD_OUT_FUNCTIONS:]),
        "eval/constraints": [_prompt_row(f"eval-if-{i:02d}", fact, constraints=EVAL_CONSTRAINTS[i % 4])
                             for i, fact in enumerate(facts[::2])],
        "eval/base_text": base_text(world),
        "inputs/instructions": instructions(world),
        "inputs/documents": [{"id": f"fact-{i:02d}", "text": answer, "source": "tiny_world", "meta": {}}
                             for i, (_, answer) in enumerate(FACTS)],
        "inputs/profiles": [{"id": f"profile-{name.lower()}", "text": profile_text(name, who), "source": "tiny_world",
                             "meta": {"name": name}} for name, who, _, _ in PROFILES],
        "inputs/safety_prompts": [_prompt_row(f"safety-{principle}-{i}", prompt, principle=principle)
                                  for principle, cases in SAFETY.items() for i, (prompt, _, _) in enumerate(cases)],
        "inputs/math_problems": math_problems(world),
        "inputs/code_tasks": code_tasks(FUNCTIONS[:-HELD_OUT_FUNCTIONS]),
        "inputs/if_tasks": [_prompt_row(f"if-{i:02d}", fact) for i, fact in enumerate(facts[1::2])],
    }
    paths = {}
    for name, rows in sets.items():
        paths[name] = out / f"{name}.jsonl"
        write_rows(paths[name], rows)
    return paths
