"""Memory of the embedding tables, by component, and the `memory` command.

MPC's headline (PAPERS.md §1) is a memory ratio: 3x with INT8 tables and a 5% FP32
cache, >7x with INT4 and 1%. Those figures match the bits-only formula
32 / (b + 32c), which ignores the per-row scale/bias and all cache metadata. This
module reports both: the paper's formula and the full accounting of every byte the
backends allocate (`memory_breakdown` gives, without allocating, exactly the
components and sizes that `backend.memory_bytes()` reports; the tests check that the
two agree and that they add up to the tensors actually allocated).

    python -m mpc memory --precision int8 int4 --cache-fraction 0.05 0.01
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from mpc.criteo import EMBEDDING_DIM, KAGGLE_CARDINALITIES
from mpc.embedding import quant
from mpc.embedding.cache import GEOMETRY_FIELDS, TRAFFIC_FIELDS, KernelLayout, set_state_width
from mpc.embedding.cache_reference import COUNTER_NAMES, cache_layout
from mpc.embedding.config import CacheConfig, CachePolicy, Precision
from mpc.errors import DataError, UserError

log = logging.getLogger(__name__)

COMPONENTS = ("weights", "values", "scale_bias", "step_counter", "cache_values", "cache_tags", "cache_policy_state",
              "lfu_counts", "cache_bookkeeping")
INT64, INT32, FP32 = 8, 4, 4


def memory_breakdown(cardinalities, dim: int, precision: Precision | str,
                     cache: CacheConfig | None = None) -> dict[str, int]:
    """Bytes by component of the backend built for these tables (nothing is allocated).

    The keys and values equal `build_embedding(config).memory_bytes()` for the fp32
    backend (precision fp32, no cache), the uncached low-precision backend (fraction 0)
    and the cached one.
    """
    precision, cache = Precision(precision), cache or CacheConfig()
    cards = [int(c) for c in cardinalities]
    rows = sum(cards)
    if precision is Precision.FP32:
        if cache.fraction > 0:
            raise UserError("fp32 tables have no FP32 cache (cache fraction must be 0 for fp32)")
        return {"weights": rows * dim * FP32}
    out = {**quant.values_bytes(precision, rows, dim), "step_counter": INT64}  # the rounding stream's step
    if cache.fraction == 0:
        return out
    layout = cache_layout(cards, cache)
    kl = KernelLayout.of(layout, cache.policy)
    slots, groups, lfu = layout.slots, len(layout.groups), cache.policy is CachePolicy.LFU
    out["cache_values"] = slots * dim * FP32
    out["cache_tags"] = slots * INT64 + kl.index_entries * INT32
    out["cache_policy_state"] = (slots * INT64 + (slots * INT32 if lfu else 0) + kl.ordered_slots * 2 * INT32
                                 + kl.structured_sets * set_state_width(cache.policy) * INT32 + kl.header_bytes)
    out["lfu_counts"] = rows * INT32 if lfu else 0
    out["cache_bookkeeping"] = (groups * INT64 + len(cards) * len(COUNTER_NAMES) * INT64
                                + len(TRAFFIC_FIELDS) * INT64 + groups * len(GEOMETRY_FIELDS) * INT64
                                + (len(cards) + 1) * INT64)  # clocks, counters, traffic, geometry,
    return out                                               # table starts


def paper_reduction(precision: Precision | str, fraction: float) -> float:
    """The bits-only ratio 32 / (b + 32c) that the paper's headline numbers follow."""
    return 32.0 / (Precision(precision).bits + 32.0 * fraction)


def memory_row(cardinalities, dim: int, precision, cache: CacheConfig) -> dict:
    """One line of the report: breakdown, total, and both reductions vs FP32."""
    parts = memory_breakdown(cardinalities, dim, precision, cache)
    total = sum(parts.values())
    fp32 = sum(int(c) for c in cardinalities) * dim * FP32
    return {"precision": Precision(precision).value, "cache_fraction": cache.fraction,
            "components": parts, "total_bytes": total,
            "reduction_paper_formula": paper_reduction(precision, cache.fraction),
            "reduction_full_accounting": fp32 / total}


# --- cardinalities from the command line -----------------------------------------------
def read_cardinalities(spec: str) -> tuple[int, ...]:
    """'kaggle' or a file: a JSON list of integers, or integers separated by blanks/commas."""
    if spec.lower() == "kaggle":
        return KAGGLE_CARDINALITIES
    path = Path(spec)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such cardinalities file (give 'kaggle' or a file of integers)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read cardinalities ({type(e).__name__}: {e})") from None
    cards = _parse_json(path, text) if text.lstrip().startswith("[") else _parse_text(path, text)
    if not cards:
        raise DataError("no cardinalities in the file", path=path)
    return tuple(cards)


def _parse_json(path: Path, text: str) -> list[int]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg})", path=path, line=e.lineno) from None
    if not isinstance(values, list):
        raise DataError("expected a JSON list of integers", path=path)
    for k, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError("cardinalities must be positive integers", path=path, field=f"item {k}", value=v)
    return values


def _parse_text(path: Path, text: str) -> list[int]:
    cards = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for token in re.split(r"[\s,]+", line.split("#", 1)[0].strip()):
            if not token:
                continue
            if not re.fullmatch(r"\d+", token) or int(token) < 1:
                raise DataError("cardinalities must be positive integers", path=path, line=lineno, value=token)
            cards.append(int(token))
    return cards


# --- the command ------------------------------------------------------------------------
def _list_of(convert):
    """argparse type: one value or several separated by commas."""
    def parse(text: str):
        return [convert(t) for t in text.split(",") if t.strip()]
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _precision(text: str) -> str:
    import argparse

    try:
        return Precision(text.strip().lower()).value
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown precision {text!r}; choose from "
                                         f"{', '.join(p.value for p in Precision)}") from None


def register_cli(sub) -> None:
    from mpc.cli import fraction, non_negative_int, positive_int

    p = sub.add_parser("memory", help="bytes of the embedding tables by component, and the reduction vs FP32",
                       description=__doc__.splitlines()[0])
    p.add_argument("--precision", nargs="+", type=_list_of(_precision),
                   default=[["int8"]], metavar="P", help="fp32 fp16 int8 int4 int2 (several allowed)")
    p.add_argument("--cache-fraction", nargs="+", type=_list_of(fraction), default=[[0.05]], metavar="F",
                   help="FP32 cache rows as a fraction of each table's rows (several allowed)")
    p.add_argument("--dim", type=positive_int, default=EMBEDDING_DIM, help="embedding dimension (16)")
    p.add_argument("--cardinalities", default="kaggle",
                   help="'kaggle' (default) or a file: JSON list or whitespace/comma-separated integers")
    p.add_argument("--policy", choices=[c.value for c in CachePolicy], default="lru",
                   help="lfu adds a counter per row")
    p.add_argument("--ways", type=non_negative_int, default=CacheConfig.ways,
                   help="cache associativity (0 = fully associative; default 32)")
    p.add_argument("--shared", action="store_true", help="one cache budget over all tables")
    p.add_argument("--json", dest="json_out", metavar="PATH", help="also write the rows as JSON")
    p.set_defaults(func=_cli_memory)


def _cli_memory(args) -> int:
    from mpc.runinfo import atomic_write_json

    cards = read_cardinalities(args.cardinalities)
    precisions = [p for group in args.precision for p in group]
    fractions = [f for group in args.cache_fraction for f in group]
    rows = []
    for precision in dict.fromkeys(precisions):
        for f in dict.fromkeys([0.0] if precision == "fp32" else fractions):
            cache = CacheConfig(fraction=f, policy=args.policy, ways=args.ways, shared=args.shared)
            rows.append(memory_row(cards, args.dim, precision, cache))
    print(format_report(rows, cards, args))
    if args.json_out:
        atomic_write_json(args.json_out, {"cardinalities": list(cards), "dim": args.dim, "policy": args.policy,
                                          "ways": args.ways, "shared": args.shared, "rows": rows})
    return 0


UNITS = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))


def _unit(fp32_bytes: int) -> tuple[float, str]:
    """The largest unit in which the FP32 size reads at least 10."""
    return next(((f, n) for f, n in UNITS if fp32_bytes >= 10 * f), (1, "B"))


def format_report(rows: list[dict], cards, args) -> str:
    fp32 = sum(cards) * args.dim * FP32
    factor, name = _unit(fp32)

    def _mb(n: int) -> str:
        return f"{n / factor:,.1f}"

    ways = "fully associative" if args.ways == 0 else f"{args.ways}-way"
    head = [f"{len(cards)} tables, {sum(cards):,} rows, dim {args.dim}; FP32 tables: {fp32:,} bytes "
            f"({fp32 / 1e9:.3f} GB)",
            f"cache: {args.policy.upper()}, {ways}, "
            f"{'one budget shared by all tables' if args.shared else 'per table'}",
            f"Sizes in {name} (1 {name} = {factor:g} bytes). x paper: 32/(b+32c), bits only. "
            f"x full: FP32 bytes / total bytes.", ""]
    cols = ["precision", "cache", "values", "scale/bias", "cache rows", "cache tags", "policy state",
            "LFU counts", "other", "total", "total bytes", "x paper", "x full"]
    table = []
    for r in rows:
        c = r["components"]
        values = c.get("values", c.get("weights", 0))
        table.append([r["precision"], f"{r['cache_fraction'] * 100:g}%", _mb(values), _mb(c.get("scale_bias", 0)),
                      _mb(c.get("cache_values", 0)), _mb(c.get("cache_tags", 0)),
                      _mb(c.get("cache_policy_state", 0)), _mb(c.get("lfu_counts", 0)),
                      _mb(c.get("cache_bookkeeping", 0) + c.get("step_counter", 0)), _mb(r["total_bytes"]), f"{r['total_bytes']:,}",
                      f"{r['reduction_paper_formula']:.2f}", f"{r['reduction_full_accounting']:.2f}"])
    widths = [max(len(cols[k]), *(len(row[k]) for row in table)) for k in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table]
    return "\n".join(head + lines)
