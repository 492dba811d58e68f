"""Generation backends behind one interface."""

import socket

import pytest

from alignment.checkpoint import init_checkpoint
from alignment.generation import GenerationError, GenerationSpec, make_generator

PROMPTS = [
    [{"role": "user", "content": "Tell me a story about a fox."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "A raw completion prompt:",
]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    model = init_checkpoint("tiny", tmp_path_factory.mktemp("m") / "tiny", seed=1, num_hidden_layers=2,
                            initializer_range=0.4)
    spec = GenerationSpec(model=str(model), dtype="float32", max_new_tokens=12, batch_size=3)
    with make_generator(spec) as gen:
        yield spec, gen


def test_greedy_batched_equals_one_by_one(generator):
    spec, gen = generator
    params = spec.sampling(temperature=0.0, n=2)
    batched = gen.generate(PROMPTS, params)
    assert [len(c) for c in batched] == [2, 2, 2]
    for prompt, completions in zip(PROMPTS, batched):
        assert completions[0] == completions[1]  # greedy: the one answer, n times
        alone = gen.generate([prompt], params)[0][0]
        assert alone.text == completions[0].text  # left padding changes nothing
        assert completions[0].num_tokens == 12 and completions[0].finish_reason == "length"


def test_sampling_is_seeded(generator):
    spec, gen = generator
    a = gen.generate(PROMPTS[:2], spec.sampling(temperature=1.0, n=3, seed=5))
    b = gen.generate(PROMPTS[:2], spec.sampling(temperature=1.0, n=3, seed=5))
    c = gen.generate(PROMPTS[:2], spec.sampling(temperature=1.0, n=3, seed=6))
    assert a == b and a != c
    assert len({x.text for x in a[0]}) > 1


def test_a_seed_per_prompt_samples_the_same_whatever_the_batch(generator):
    """What a sharded online-DPO run needs: a prompt's samples depend on its seed, not on its neighbours."""
    spec, gen = generator
    together = gen.generate(PROMPTS, spec.sampling(temperature=1.0, n=3, seeds=[11, 12, 13]))
    reordered = gen.generate(PROMPTS[::-1], spec.sampling(temperature=1.0, n=3, seeds=[13, 12, 11]))
    alone = gen.generate(PROMPTS[1:2], spec.sampling(temperature=1.0, n=3, seeds=[12]))
    assert reordered[::-1] == together and alone[0] == together[1]
    assert together[0] != gen.generate(PROMPTS[:1], spec.sampling(temperature=1.0, n=3, seeds=[99]))[0]
    with pytest.raises(ValueError, match="seeds: one per prompt, got 2 for 3 prompts"):
        gen.generate(PROMPTS, spec.sampling(temperature=1.0, seeds=[1, 2]))


def test_stop_strings_cut_the_text(generator):
    spec, gen = generator
    full = gen.generate(PROMPTS[:1], spec.sampling(temperature=0.0))[0][0].text
    stop = full[4:6]
    cut = gen.generate(PROMPTS[:1], spec.sampling(temperature=0.0, stop=[stop]))[0][0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_backend_unreachable_server_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-very-secret-123")
    spec = GenerationSpec(backend="openai", model="teacher", base_url=f"http://127.0.0.1:{_free_port()}/v1",
                          api_key_env="MY_TEACHER_KEY", max_retries=1, timeout_s=2)
    with make_generator(spec) as gen, pytest.raises(GenerationError) as e:
        gen.generate(PROMPTS[:1], spec.sampling())
    message = str(e.value)
    assert message.startswith(f"openai backend: {spec.base_url} failed after 1 retries: APIConnectionError")
    assert "\n" not in message and "sk-very-secret" not in message


def test_missing_model_is_reported():
    with pytest.raises(GenerationError, match="generation.model"):
        make_generator(GenerationSpec())
