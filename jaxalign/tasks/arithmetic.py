"""The built-in verifiable task: multi-digit addition with the answer digits reversed.

A prompt is `"a+b="` with a, b in [10, 999]; the answer is the decimal sum
written least-significant digit first (`"123+45="` -> `"861"`), which a
2-layer transformer learns far more easily than normal order (carries flow
left to right) while staying exactly checkable. A character tokenizer of 14
symbols ships in the Hugging Face format (`assets/arithmetic_tokenizer`), so
the task goes through the ordinary `AutoTokenizer` path.

Held-out prompts are a fixed split of the (a, b) pairs by a hash, so training
never sees them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

TOKENIZER_DIR = Path(__file__).parent / "assets" / "arithmetic_tokenizer"
SYMBOLS = ("<pad>", "<eos>") + tuple("0123456789+=")
LOW, HIGH = 10, 999


def build_tokenizer(path: str | Path):
    """Write the 14-symbol character tokenizer to `path` (how the shipped asset was made)."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(SYMBOLS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<pad>")
    fast.save_pretrained(str(path))
    return fast


def load_tokenizer():
    """The shipped tokenizer through `transformers.AutoTokenizer` (no network)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def answer(a: int, b: int) -> str:
    """The reference completion: digits of a + b, least significant first."""
    return str(a + b)[::-1]


def is_held_out(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Deterministic ~10% split of (a, b) pairs reserved for evaluation."""
    return ((a * 7919 + b * 104729) % 97) < 10


@dataclasses.dataclass(frozen=True)
class Problems:
    """A batch of problems: prompt strings, reference answers, and operands."""

    prompts: list[str]
    answers: list[str]
    a: np.ndarray
    b: np.ndarray

    def __len__(self) -> int:
        return len(self.prompts)


def sample_problems(rng: np.random.Generator, n: int, *, split: str = "train") -> Problems:
    """`n` random problems from the `train` or `test` side of the held-out split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    a_out, b_out = [], []
    while len(a_out) < n:
        a = rng.integers(LOW, HIGH + 1, size=4 * n)
        b = rng.integers(LOW, HIGH + 1, size=4 * n)
        keep = is_held_out(a, b) == (split == "test")
        a_out.extend(a[keep].tolist())
        b_out.extend(b[keep].tolist())
    a, b = np.array(a_out[:n]), np.array(b_out[:n])
    return Problems([f"{x}+{y}=" for x, y in zip(a, b)], [answer(x, y) for x, y in zip(a, b)], a, b)


def held_out(n: int = 1000, seed: int = 1234) -> Problems:
    """The fixed evaluation set (same for every algorithm and run)."""
    return sample_problems(np.random.default_rng(seed), n, split="test")


def max_prompt_len() -> int:
    return len(f"{HIGH}+{HIGH}=")


def max_answer_len() -> int:
    return len(str(2 * HIGH)) + 1  # digits + EOS
