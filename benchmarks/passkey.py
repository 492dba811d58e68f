"""Passkey retrieval beyond the training length: plain RoPE vs YaRN vs DCA + YaRN, one tiny model.

    python benchmarks/passkey.py [--train-len 256] [--min-len 128] [--steps 2000] [--trials 50] [--threads 2]

A 2-layer Qwen2 (our backbone, 128 wide) is trained from scratch to answer the 5-digit pass key
hidden at a random depth in repeated filler text (Mohtashami & Jaggi 2023); the loss is on the
answer digits only. Each step draws one length in [min-len, T]: at one fixed length the model
finds the answer by absolute position and nothing transfers to longer inputs. The same weights
are then evaluated at T, 2T, 4T and 8T, exact match of 5 greedily generated digits
(transformers `generate`, KV cache), on the same prompts for every variant:

- RoPE:        as trained.
- YaRN:        static YaRN, factor 8 over L0 = T (`enable_long_context(yarn_factor=8)`).
- DCA + YaRN:  chunk T, local T/4, plus the YaRN factor: DCA positions and YaRN's temperature.
- DCA, no temperature: the same chunks without YaRN's temperature (an ablation).

Chunk T / local T/4 was the best of chunk {128, 192, 224, 256} x local {32 .. 128} on separate
validation prompts; smaller models, fewer steps and lengths from T/4 extrapolated worse with
every variant (README).

Text goes through our real Qwen2 tokenizer (digit by digit, as Qwen2 reads numbers); the ~40
distinct token ids the task uses are then renumbered into a 40-row embedding, because the full
151,936-row embedding and its optimizer state would triple the training time for rows that
never occur. RoPE base 10,000 (the pre-long-context Qwen base; with 1e6 and T = 256 most rotary
pairs would never turn in training). Prints the table; writes JSON and a PNG plot to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alignment.model import Qwen2ForCausalLM, enable_long_context, preset_config  # noqa: E402
from alignment.model.loss import IGNORE_INDEX  # noqa: E402
from alignment.tokenizer import qwen2_tokenizer  # noqa: E402
from benchmarks.common import RESULTS, write_result  # noqa: E402

INTRO = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it."
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is "
DIGITS = 5


class PasskeyTask:
    """Prompts of an exact token length, tokenised by the Qwen2 tokenizer, in a compact vocabulary."""

    def __init__(self):
        tok = qwen2_tokenizer()
        self.encode_text = lambda s: tok(s)["input_ids"]
        pieces = [INTRO, FILLER, KEY.format(key="0123456789"), QUESTION, "0123456789"]
        self.vocab = {t: i for i, t in enumerate(sorted({t for p in pieces for t in self.encode_text(p)}))}
        self.intro, self.filler, self.question = (self.encode(s) for s in (INTRO, FILLER, QUESTION))

    def encode(self, text: str) -> list[int]:
        return [self.vocab[t] for t in self.encode_text(text)]

    def sample(self, length: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """(prompt, answer digits): `length` tokens in all, the key after a random number of filler sentences."""
        key = "".join(str(rng.randrange(10)) for _ in range(DIGITS))
        key_ids, answer = self.encode(KEY.format(key=key)), self.encode(key)
        n_filler = length - len(self.intro) - len(key_ids) - len(self.question) - DIGITS
        if n_filler < 0:
            raise ValueError(f"length {length} is too short for a passkey prompt")
        filler = (self.filler * (n_filler // len(self.filler) + 1))[:n_filler]
        cut = min(rng.randrange(n_filler // len(self.filler) + 1) * len(self.filler), n_filler)
        return self.intro + filler[:cut] + key_ids + filler[cut:] + self.question, answer


def train(task: PasskeyTask, a: argparse.Namespace) -> Qwen2ForCausalLM:
    config = preset_config(
        "tiny", num_hidden_layers=a.layers, vocab_size=len(task.vocab), rope_theta=10_000.0,
        max_position_embeddings=a.train_len, initializer_range=0.02, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(a.seed)
    model = Qwen2ForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = a.steps // 10
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / a.steps)))
    )
    rng = random.Random(a.seed)
    bar = tqdm(range(a.steps), desc=f"train at T={a.train_len}")
    for _ in bar:
        length = rng.randint(a.min_len, a.train_len)  # varied, so the answer cannot be found by position
        batch = [task.sample(length, rng) for _ in range(a.batch)]
        ids = torch.tensor([prompt + answer for prompt, answer in batch])  # [batch, length]
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -DIGITS:] = ids[:, -DIGITS:]  # the loss is on the answer only
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.inference_mode()
def accuracy(model: Qwen2ForCausalLM, trials: list[tuple[list[int], list[int]]], batch: int) -> float:
    """Share of trials whose 5 greedily generated tokens are exactly the pass key."""
    hits = 0
    for s in range(0, len(trials), batch):
        prompts = torch.tensor([p for p, _ in trials[s : s + batch]])
        answers = torch.tensor([ans for _, ans in trials[s : s + batch]])
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=DIGITS,
                             min_new_tokens=DIGITS, do_sample=False, pad_token_id=0)
        hits += (out[:, prompts.shape[1] :] == answers).all(-1).sum().item()
    return hits / len(trials)


def variants(model: Qwen2ForCausalLM, train_len: int, factor: int) -> dict[str, Qwen2ForCausalLM]:
    """The trained weights under each way of running long inputs."""
    chunk, local = train_len, train_len // 4
    no_temperature = enable_long_context(model.config, chunk, local)
    no_temperature.dual_chunk_attention_config["original_max_position_embeddings"] = 0
    configs = {
        "RoPE": model.config,
        "YaRN": enable_long_context(model.config, yarn_factor=factor),
        "DCA + YaRN": enable_long_context(model.config, chunk, local, yarn_factor=factor),
        "DCA, no temperature": no_temperature,
    }
    out = {}
    for name, config in configs.items():
        out[name] = Qwen2ForCausalLM(config).eval()
        out[name].load_state_dict(model.state_dict())
    return out


def plot(table: dict[str, dict[int, float]], train_len: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, row), style in zip(table.items(), ("-o", "--s", "-^", ":v")):
        ax.plot(list(row), [100 * v for v in row.values()], style, label=name, alpha=0.85)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(next(iter(table.values()))), [f"{n // train_len}T = {n}" for n in next(iter(table.values()))])
    ax.set_ylim(-5, 105)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey exact match (%)")
    ax.set_title(f"Passkey retrieval, tiny Qwen2 trained at T = {train_len}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-len", type=int, default=256, help="training length T")
    ap.add_argument("--min-len", type=int, default=128, help="training lengths are uniform in [min-len, T]")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--trials", type=int, default=50, help="prompts per length")
    ap.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4, 8], help="evaluated lengths, in T")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    task = PasskeyTask()
    start = time.perf_counter()
    model = train(task, a)
    train_s = time.perf_counter() - start
    lengths = [m * a.train_len for m in a.multiples]
    trials = {n: [task.sample(n, random.Random(a.seed * 1000 + n)) for _ in range(a.trials)] for n in lengths}
    table = {}
    for name, m in variants(model, a.train_len, max(a.multiples)).items():
        table[name] = {n: accuracy(m, trials[n], batch=10) for n in tqdm(lengths, desc=name)}
    eval_s = time.perf_counter() - start - train_s

    header = " | ".join(f"{f'{n // a.train_len}T={n}':>9}" for n in lengths)
    print(f"\npasskey exact match over {a.trials} trials, trained at T={a.train_len} ({a.steps} steps, "
          f"{train_s / 60:.1f} min training, {eval_s / 60:.1f} min evaluation, {a.threads} threads)")
    print(f"{'':>20} | {header}")
    for name, row in table.items():
        print(f"{name:>20} | " + " | ".join(f"{100 * v:>8.0f}%" for v in row.values()))
    name = f"passkey-T{a.train_len}"
    plot(table, a.train_len, RESULTS / f"{name}.png")
    write_result(name, {"args": vars(a), "accuracy": {k: {str(n): v for n, v in r.items()} for k, r in table.items()},
                        "train_s": train_s, "eval_s": eval_s})


if __name__ == "__main__":
    main()
