"""Facts about Criteo Kaggle and the DLRM reference (PAPERS.md §4), in one place.

The TSV layout, the 26 table cardinalities, the 7-"day" split and the reference
model's shape. Everything else imports these rather than repeating numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE  # label, I1..I13, C1..C26

KAGGLE_LINES = 45_840_617
KAGGLE_CTR = 0.256
KAGGLE_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
assert sum(KAGGLE_CARDINALITIES) == 33_762_577

EMBEDDING_DIM = 16
BOTTOM_MLP = (NUM_DENSE, 512, 256, 64, EMBEDDING_DIM)
TOP_MLP = (367, 512, 256, 1)  # 367 = 16 + 27*26/2 pairwise dots

DAYS = 7


def field_name(i: int) -> str:
    """Name of TSV field i (0-based): label, I1..I13, C1..C26."""
    if i == 0:
        return "label"
    if i <= NUM_DENSE:
        return f"I{i}"
    return f"C{i - NUM_DENSE}"


@dataclass(frozen=True)
class SplitSizes:
    train: int
    test: int
    val: int

    @property
    def total(self) -> int:
        return self.train + self.test + self.val

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Row ranges [start, stop) in file order: train, then test, then val."""
        a = self.train
        b = a + self.test
        return {"train": (0, a), "test": (a, b), "val": (b, b + self.val)}


def split_sizes(n_lines: int) -> SplitSizes:
    """The DLRM reference split of n lines into 7 consecutive "days".

    Days get n // 7 lines each, the remainder going one each to the first days;
    days 0-5 are the training set; day 6 is halved, the first (larger) half the
    test set and the second the validation set.

    >>> split_sizes(45_840_617)
    SplitSizes(train=39291958, test=3274330, val=3274329)
    """
    if n_lines < 0:
        raise ValueError(f"line count must be non-negative, got {n_lines}")
    base, rem = divmod(n_lines, DAYS)
    days = [base + (1 if d < rem else 0) for d in range(DAYS)]
    last = days[-1]
    test = (last + 1) // 2
    return SplitSizes(train=sum(days[:-1]), test=test, val=last - test)
