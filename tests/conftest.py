import gc
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tokenizer():
    from alignment.tokenizer import qwen2_tokenizer

    return qwen2_tokenizer()


def pytest_collection_finish(session):
    """What collection imported (torch, transformers, TRL) is never garbage: keep the collector off it, as the CLI
    does, so the full collections while trainers are built in this process do not rescan it."""
    gc.freeze()


def pytest_sessionfinish(session, exitstatus):
    gc.unfreeze()  # the interpreter's last collection frees them (nanobind reports leaks otherwise)
