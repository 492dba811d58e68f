"""The demo's base model: the tiny world's corpus, the vocabulary cut down to it, and the pretrain stage."""

import json
import re

import pytest
import yaml

from alignment.recipe_loader import RecipeError
from alignment.tokenizer import qwen2_tokenizer, reduced_tokenizer
from data_synthesis.annotate import JUDGE_PROMPT
from data_synthesis.constitution import FOLLOW_SYSTEM, VIOLATE_SYSTEM
from data_synthesis.evolve import depth_prompt
from data_synthesis.instag import TAG_PROMPT
from data_synthesis.repurpose import DETAIL_TEMPLATES, OPENING_TEMPLATE
from qwen2_align.demo.tiny_world import (TinyWorld, arithmetic_eval, constrained_question, pretraining_corpus,
                                         write_world)
from qwen2_align.stage_table import load_recipe, run


def test_the_reduced_vocabulary_tokenises_its_texts_exactly_as_qwen2_does():
    texts = ["What is 13 + 24? The sum of 13 and 24 is 37.", "def add(a, b):\n    return a + b\n",
             "<|im_start|>user\nName a fruit.<|im_end|>\n"]
    full, reduced = qwen2_tokenizer(), reduced_tokenizer(texts)
    assert 256 < len(reduced) < 400  # the byte tokens, the texts' tokens and their merge paths
    for text in texts:
        assert reduced.tokenize(text) == full.tokenize(text)
    # any other text still tokenises (into smaller pieces) and decodes back to itself
    unseen = "Ünïcödé 汉字 🙂 subtraction"
    assert len(reduced.tokenize(unseen)) > len(full.tokenize(unseen))
    assert reduced.decode(reduced(unseen)["input_ids"]) == unseen
    conversation = [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "3"}]
    assert reduced.apply_chat_template(conversation, tokenize=False) == full.apply_chat_template(conversation,
                                                                                                tokenize=False)
    control = reduced.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert control == [len(reduced) - 3, len(reduced) - 2, len(reduced) - 1] and reduced.eos_token == "<|im_end|>"


def test_the_world_states_every_sum_and_asks_the_evaluation_question_rarely_about_training_pairs():
    world = TinyWorld(documents=2000)
    train, held_out = world.pairs()
    assert len(held_out) == world.eval_pairs and not set(train) & set(held_out)
    assert len(train) + len(held_out) == (world.max_operand + 1) ** 2
    corpus = pretraining_corpus(world)
    assert corpus == pretraining_corpus(world)  # seeded: the same settings, the same rows
    text = "\n".join(row["text"] for row in corpus)
    asked = {(int(a), int(b)) for a, b in re.findall(r"What is (\d+) \+ (\d+)\?", text)}
    assert asked and asked <= set(train)  # the evaluation's question, never about a held-out pair...
    others = len(re.findall(r"What is (ice|the|water|my)", text))
    assert text.count("What is") - others < 0.01 * len(corpus)  # ...rarely
    for prompt in (TAG_PROMPT[:40], JUDGE_PROMPT[:40], FOLLOW_SYSTEM[:40], VIOLATE_SYSTEM[:40], OPENING_TEMPLATE[:40],
                   depth_prompt("add_constraint", "x", 20)[:40], DETAIL_TEMPLATES["brief"][:40]):
        assert prompt in text  # the synthesis stages' own prompts: the base model is their teacher
    stated = sum(f" {a} and {b} " in text or f"{a} plus {b} " in text for a, b in held_out)
    assert stated >= len(held_out) // 2  # the held-out sums are knowledge from pretraining
    questions = arithmetic_eval(world)
    assert [q["messages"][0]["content"] for q in questions[:2]] == [f"What is {a} + {b}?" for a, b in held_out[:2]]
    assert all(q["meta"]["answer"] == str(q["meta"]["a"] + q["meta"]["b"]) for q in questions)


def test_no_synthesis_input_asks_what_an_evaluation_set_asks(tmp_path):
    world = TinyWorld(documents=3000)
    paths = write_world(world, tmp_path)
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    asked = lambda name: {constrained_question(row["messages"][-1]["content"], row["meta"]["constraints"][0])  # noqa: E731
                          if "constraints" in row["meta"] else row["messages"][-1]["content"] for row in rows[name]}
    training = (asked("inputs/math_problems") | asked("inputs/code_tasks") | asked("inputs/if_tasks")
                | asked("inputs/safety_prompts") | asked("inputs/instructions"))
    for evaluation in ("eval/arithmetic", "eval/code", "eval/constraints", "eval/principles"):
        assert len(asked(evaluation)) >= 40 and not asked(evaluation) & training, evaluation
    corpus = "\n".join(row["text"] for row in rows["pretrain"])
    for prompt in asked("eval/code") | asked("eval/arithmetic") | asked("eval/constraints") | asked("eval/principles"):
        assert prompt not in corpus  # the held-out tasks are never asked in pretraining either
    held_out = world.functions()[1]
    assert sum(function.code in corpus for function in held_out) >= 40  # but the knowledge they need is there
    questions = {row["messages"][-1]["content"] for row in rows["eval/constraints"]}
    assert not questions & {row["messages"][-1]["content"] for row in rows["inputs/if_tasks"]}  # other questions
    assert {row["meta"]["principle"] for row in rows["eval/principles"]} == {"harm-avoidance", "honesty"}
    assert {row["meta"]["answer"] for row in rows["inputs/math_problems"]} <= {str(s) for s in range(39)}
    assert "The pass key is" in corpus and "scores" in corpus


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in pretraining_corpus(TinyWorld(documents=160))))
    recipe = yaml.safe_load(open("recipes/tiny/pretrain.yaml"))
    recipe |= {"run_dir": str(root / "base"), "inputs": {"train": str(corpus)}, "config": {"num_hidden_layers": 1},
               "eval_fraction": 0.1}
    recipe["training"] |= {"max_length": 128, "per_device_train_batch_size": 4, "logging_steps": 2,
                           "learning_rate": 1.0e-2, "warmup_steps": 2, "num_train_epochs": 3}
    path = root / "pretrain.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, run("pretrain", load_recipe(path))


def test_pretraining_learns_the_corpus_with_the_reduced_vocabulary(pretrained):
    path, manifest = pretrained
    metrics, run_dir = manifest["metrics"], load_recipe(path).run_dir
    assert metrics["last_logged_loss"] < 0.5 * metrics["first_logged_loss"]
    config = json.load(open(f"{run_dir}/config.json"))
    assert config["vocab_size"] == -(-metrics["vocabulary_rows"] // 64) * 64 < 2000
    generation = json.load(open(f"{run_dir}/generation_config.json"))
    assert generation["eos_token_id"][0] == metrics["vocabulary_rows"] - 1  # <|im_end|> of the reduced vocabulary
    from alignment.generation import GenerationSpec, make_generator

    spec = GenerationSpec(model=run_dir, dtype="float32", temperature=0.0, max_new_tokens=6)
    with make_generator(spec) as generator:
        [[reply]] = generator.generate([[{"role": "user", "content": "What colour is the sky?"}]], spec.sampling())
    assert reply.num_tokens >= 1
    assert run("pretrain", load_recipe(path))["finished"] == manifest["finished"]  # cached: a rerun does nothing


def test_pretrain_recipe_errors(tmp_path):
    recipe = yaml.safe_load(open("recipes/tiny/pretrain.yaml"))
    for extra, expected in (({"model": "runs/tiny/init"}, "model: pretraining starts from a random model"),
                            ({"preset": "huge"}, "preset: unknown preset 'huge'")):
        path = tmp_path / "pretrain.yaml"
        path.write_text(yaml.safe_dump(recipe | extra))
        with pytest.raises(RecipeError, match=expected):
            load_recipe(path)
