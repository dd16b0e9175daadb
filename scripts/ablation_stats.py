"""Seeds in an ablation (scripts/ablation_report.py): each variant's mean and spread over its seeds, and its
paired difference from a reference variant, with a plain verdict on whether it stands out from the noise.

Paired: a variant's run with seed s is compared with the reference's run with the same seed s, which saw
the same batches in the same order (the seed sets the batch order and the initial weights), so that part of
the noise cancels. Over n seeds the differences d_1..d_n give a mean and a standard deviation (n - 1 in the
denominator), and the 95% interval of the mean difference, mean +- t * std / sqrt(n) with Student's t at
n - 1 degrees of freedom. The difference "exceeds the seed-to-seed spread" when that interval excludes zero;
otherwise the seeds do not show a difference. With 3 seeds t is 4.30: the mean must exceed about 2.5 times
the standard deviation of the differences.
"""

import math
import statistics
from typing import Optional

# Student's t for a two-sided 95% interval, by degrees of freedom 1..10; more seeds use 10's (a wider
# interval than the exact one: never claims more).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


class SeedError(ValueError):
    pass


def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (None for fewer than 1 and 2 values)."""
    mean = statistics.mean(values) if values else None
    return mean, statistics.stdev(values) if len(values) > 1 else None


def paired_difference(values: dict, reference: dict) -> Optional[dict]:
    """`values` - `reference` over the seeds both have ({seed: metric}): the mean, std and 95% interval of
    the differences, and `exceeds` (None with one seed: no spread to compare with). None: no common seed."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    diffs = [values[s] - reference[s] for s in seeds]
    mean, std = mean_std(diffs)
    out = {"seeds": seeds, "diffs": diffs, "mean": mean, "std": std, "low": None, "high": None, "exceeds": None}
    if std is not None:
        half = T95[min(len(diffs) - 1, len(T95)) - 1] * std / math.sqrt(len(diffs))
        out.update(low=mean - half, high=mean + half, exceeds=not mean - half <= 0 <= mean + half)
    return out


def variant_groups(rows: list[dict], metric: str) -> dict[str, dict]:
    """{variant: {seed: metric}} of runs in `rows` order, leaving out runs without the metric (no evaluation
    yet). Two runs of one variant with one seed are an error: which one counts would be arbitrary."""
    groups: dict[str, dict] = {}
    for r in rows:
        if r.get(metric) is None:
            continue
        seeds = groups.setdefault(r["variant"], {})
        if r["seed"] in seeds:
            raise SeedError(f"two runs of {r['variant']} with seed {r['seed']} ({r['run_dir']} and another): "
                            "report their sweeps separately, or rerun one with another seed=")
        seeds[r["seed"]] = r[metric]
    return groups


def seed_summary(rows: list[dict], metric: str) -> list[dict]:
    """One entry per variant: its seeds, mean and std of `metric`, and its paired difference from the first
    variant (the reference: MHA when the sweep has it; rows come sorted)."""
    groups = variant_groups(rows, metric)
    reference = next(iter(groups), None)
    out = []
    for variant, by_seed in groups.items():
        mean, std = mean_std(list(by_seed.values()))
        diff = None if variant == reference else paired_difference(by_seed, groups[reference])
        out.append({"variant": variant, "reference": reference, "by_seed": by_seed, "n": len(by_seed),
                    "mean": mean, "std": std, "diff": diff})
    return out


def verdict(entry: dict, unit: str, spec: str = "+.4f") -> str:
    """The plain statement for one variant of seed_summary, e.g. 'gqa - mha: +0.0123 bits/byte (+- 0.0040
    over 3 seeds, 95% interval +0.0024 to +0.0222): exceeds the seed-to-seed spread'."""
    d, name = entry["diff"], f"{entry['variant']} - {entry['reference']}"
    if d is None:
        return f"{name}: no seed in common, no paired difference"
    head = f"{name}: {format(d['mean'], spec)}" + (f" {unit}" if unit else "")
    if d["exceeds"] is None:
        return f"{head} (one seed): no spread to compare with, run more seeds"
    spread = (f" (+- {format(d['std'], spec.lstrip('+'))} over {len(d['seeds'])} seeds, 95% interval "
              f"{format(d['low'], spec)} to {format(d['high'], spec)})")
    return head + spread + (": exceeds the seed-to-seed spread" if d["exceeds"] else
                            ": within the seed-to-seed spread, the seeds do not show a difference")
