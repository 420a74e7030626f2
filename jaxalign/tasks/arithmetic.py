"""The built-in verifiable task: addition with every number written least-significant digit first.

A problem is a + b with a, b in [10, 999]. Every number is zero-padded to a
fixed width and written least significant digit first: 123 + 45 is the
prompt `"321+540="` and the answer `"8610"` (168 -> "0168" -> reversed).
Why: the token that predicts answer digit i sits at position 7 + i and the
operand digits it adds at positions i and 4 + i, always 7 and 3 tokens back,
a pattern that relative position embeddings (RoPE) make easy to learn. In
normal order and unpadded (`"123+45="` -> `"861"`) those distances change
with the operands' lengths and a 2-layer model waits on a plateau for a
seed- and rounding-dependent number of steps (docs/comparison-recipe.md).
The answer stays exactly checkable.

A character tokenizer of 14 symbols ships in the Hugging Face format
(`assets/arithmetic_tokenizer`), so the task goes through the ordinary
`AutoTokenizer` path. Held-out prompts are a fixed split of the (a, b) pairs
by a hash, so training never sees them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

TOKENIZER_DIR = Path(__file__).parent / "assets" / "arithmetic_tokenizer"
SYMBOLS = ("<pad>", "<eos>") + tuple("0123456789+=")
LOW, HIGH = 10, 999
WIDTH = 3  # operand digits
ANSWER_WIDTH = 4  # digits of the largest sum, 1998


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


def write(n: int, width: int) -> str:
    """`n` zero-padded to `width` digits, least significant first: write(45, 3) == "540"."""
    if not 0 <= n < 10**width:
        raise ValueError(f"{n} does not fit in {width} digits")
    return f"{n:0{width}d}"[::-1]


def read(digits: str) -> int:
    """The inverse of `write`: read("540") == 45."""
    return int(digits[::-1])


def prompt(a: int, b: int) -> str:
    """`"321+540="` for 123 + 45."""
    return f"{write(a, WIDTH)}+{write(b, WIDTH)}="


def answer(a: int, b: int) -> str:
    """The reference completion: the 4 digits of a + b, least significant first ("8610" for 168)."""
    return write(a + b, ANSWER_WIDTH)


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


def _operands(rng: np.random.Generator, size: int, digits: str) -> tuple[np.ndarray, np.ndarray]:
    task = lambda: rng.integers(LOW, HIGH + 1, size=size)  # noqa: E731
    if digits == "task":
        return task(), task()
    if digits == "mixed":
        # Every digit 0 with probability 1/2, else uniform in 0-9 (so 0 with probability 0.55 in all).
        sparse = lambda: (rng.integers(0, 10, (size, WIDTH)) * (rng.random((size, WIDTH)) < 0.5)  # noqa: E731
                          ) @ 10 ** np.arange(WIDTH)
        pick = rng.random(size) < 0.5
        return np.where(pick, sparse(), task()), np.where(pick, sparse(), task())
    raise ValueError(f"digits must be 'task' or 'mixed', got {digits!r}")


def sample_problems(rng: np.random.Generator, n: int, *, split: str = "train", digits: str = "task") -> Problems:
    """`n` random problems from the `train` or `test` side of the held-out split.

    `digits="task"`: a, b uniform in [LOW, HIGH], the task (evaluation, RL
    prompts, preference pairs). `digits="mixed"`, the SFT demonstrations:
    half the problems so, half with every operand digit 0 with probability
    1/2 (else uniform 0-9; operands may then be below LOW, even 0). Why: on
    the task's operands (a_i + b_i) mod 10 is independent of either digit
    alone, so nothing rewards attending to one operand before the model
    attends to both, and SFT waits on a plateau for a seed-dependent time;
    where b_i = 0 the answer digit is a_i (plus the carry), a first-order
    signal that teaches where the digits are.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    a_out, b_out = [], []
    while len(a_out) < n:
        a, b = _operands(rng, 4 * n, digits)
        keep = is_held_out(a, b) == (split == "test")
        a_out.extend(a[keep].tolist())
        b_out.extend(b[keep].tolist())
    a, b = np.array(a_out[:n]), np.array(b_out[:n])
    return Problems([prompt(x, y) for x, y in zip(a, b)], [answer(x, y) for x, y in zip(a, b)], a, b)


def held_out(n: int = 1000, seed: int = 1234) -> Problems:
    """The fixed evaluation set (same for every algorithm and run)."""
    return sample_problems(np.random.default_rng(seed), n, split="test")


def max_prompt_len() -> int:
    return 2 * WIDTH + 2


def max_answer_len() -> int:
    return ANSWER_WIDTH + 1  # digits + EOS
