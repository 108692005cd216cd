"""The learner's benchmark: does it personalize the rules its features can express, and never serve worse than the
best fixed prompt where no rule is learnable?

Rules come from the planted ranker (rpp/llm/planted.py; no LLM): a FAMILY drawn from one seed (rpp.agents.planted
.draw_family: a feature among five the user row holds or a NULL hash of the user id, any agents, 2-5 groups,
additive or joint, three noise levels) or the genre rules of the pass bar (2 and 4 groups on history + reasoning).
Each rule is trained with the whole budget of a config (default experiments/ml100k.yaml: 768 steps) by each
learner and scored on its 300 test users, with the run's gate applied (what the run SERVES):

    python experiments/bench_planted.py --family 20 --family-seed 20261206      # the record: planted.md
    python experiments/bench_planted.py --genre-bar                              # 2 and 4 genre groups, seeds 0-2
    python experiments/bench_planted.py --family 6 --learners no_state_row no_ranking_gru   # the ablations

Per rule: users optimal, NDCG vs the oracle, captured headroom H = (served - best fixed) / (oracle - best fixed),
distinct prompts, and for null rules harm = (best fixed - served) / best fixed; beside them the references: a
Thompson bandit TOLD each user's group (a rule is learnable when it finds >= 95% of users' best prompts with the
budget) and the supervised group ceilings (linear and one-hidden-layer probes on the user rows, trained with the
true groups). The sample-efficiency curve scores the policy (ungated) on 100 test users at 128 / 256 / 512 / 768
steps. Rows are appended to <out>.jsonl as they finish; the table, the summary (<out stem>-family.json) and the
PNG are rebuilt from all rows each time, so a partial run is a partial record.
"""
from __future__ import annotations

import argparse
import json
import re
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rpp.agents.planted import bandit_references, draw_family, planted_check, planted_config  # noqa: E402
from rpp.config import load_config  # noqa: E402

LEARNERS = {
    # name: (description, overrides)
    "thompson": ("the default learner (train.learner: thompson, docs/learner.md)", []),
    "ppo": ("SB3's PPO alone over the four agents (entropy 0.05 annealed to 0)",
            ["train.learner=ppo", "train.ent_coef=0.05", "train.ent_coef_final=0"]),
    "no_state_row": ("thompson with the BERT state row switched off (ablation)", ["train.ablate=[state_row]"]),
    "no_ranking_gru": ("thompson with the GRU over the ranking switched off (ablation)",
                       ["train.ablate=[ranking_gru]"]),
}
CURVE = (128, 256, 512, 768)
LEARNABLE = 0.95
"""Share of users the told-group bandit must serve their best prompt for a rule to count as learnable, and for a
null rule to count as within the budget (the groups' best prompts are what the best fixed prompt is made of)."""
MAX_NULL_HARM = 0.02


def genre_bar() -> list[tuple[dict, int]]:
    """The pass bar: 2 and 4 dominant-genre groups on history + reasoning, seeds 0-2 (the rule's seed)."""
    return [({"feature": "genre", "agents": ["history", "reasoning"], "groups": g, "interaction": "additive",
              "noise": 0.05}, seed) for g in (2, 4) for seed in (0, 1, 2)]


REFERENCES = ("bandit_told_group", "bandit_told_feature", "group_ceiling", "group_ceiling_mlp", "told_curve")
"""Columns that depend on the rule, seed and budget only: computed with the default learner's run, shared by the
other learners' rows of the same rule."""


def run(rule: dict, seed: int, learner: str, base_path: str, extra: list[str], curve: bool) -> dict:
    base = load_config(base_path, [*LEARNERS[learner][1], *extra])
    references = learner == "thompson"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = planted_config(base, rule, seed, tmp)
        start = time.perf_counter()
        result = planted_check(cfg, curve=CURVE if curve else (), references=references)
        told_curve = {b: bandit_references(cfg, _ranker(cfg), steps=b)["bandit_told_group"] for b in CURVE} \
            if curve and references else {}
    result.pop("run_dir", None)
    return {"learner": learner, "seed": seed, "rule_spec": rule, **result,
            **({"told_curve": told_curve} if references else {}), "wall_s": round(time.perf_counter() - start, 1)}


def _ranker(cfg):
    from rpp.llm import make_ranker

    return make_ranker(cfg)


def share_references(rows: list[dict]) -> None:
    """Give every row the REFERENCES of the default learner's row of the same rule and seed (in place)."""
    key = lambda r: (json.dumps(r["rule_spec"], sort_keys=True), r["seed"])  # noqa: E731
    refs = {key(r): r for r in rows if r["learner"] == "thompson"}
    for row in rows:
        ref = refs.get(key(row))
        if ref is not None and row is not ref:
            for name in REFERENCES:
                row.setdefault(name, ref.get(name))


def is_null(row: dict) -> bool:
    return row["rule_spec"]["feature"] == "user_hash"


def in_budget(row: dict) -> bool:
    """The told-group bandit finds >= LEARNABLE of users' best prompts with the run's budget."""
    return (row.get("bandit_told_group") or 0) >= LEARNABLE


def learnable(row: dict) -> bool:
    return not is_null(row) and in_budget(row)


def kind(row: dict) -> str:
    if is_null(row):
        return "null" if in_budget(row) else "null, beyond budget"
    return "learnable" if learnable(row) else "not learnable"


def family_seed(row: dict) -> str:
    """The family seed a rule row was drawn from (its command's --family-seed)."""
    found = re.findall(r"--family-seed (\d+)", row.get("command", ""))
    return found[0] if found else "?"


def rule_name(row: dict) -> str:
    r = row["rule_spec"]
    return (f"{r['feature']} g{r['groups']} {'+'.join(a[:3] for a in r['agents'])} {r['interaction'][:3]} "
            f"n{r['noise']}")


def _fmt(x, spec=".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows: list[dict]) -> str:
    out = ["| # | rule (feature, groups, agents, interaction, noise) | seed | learner | kind | told bandit | probe lin / mlp "
           "| served | users optimal | NDCG / oracle | H | harm | harm vs upper bound | distinct prompts | gate LCB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    several = len({family_seed(r) for r in rows if "index" in r}) > 1  # then # names the family seed too
    for row in rows:
        gate = row.get("gate") or {}
        number = f"{family_seed(row)}/{row['index']}" if several and "index" in row else row.get("index", "")
        out.append(f"| {number} | {rule_name(row)} | {row['seed']} | {row['learner']} | {kind(row)} | "
                   f"{_fmt(row.get('bandit_told_group'))} | {_fmt(row.get('group_ceiling'))} / "
                   f"{_fmt(row.get('group_ceiling_mlp'))} | {row['served']} | {row['optimal_share']:.3f} | "
                   f"{row['ndcg_vs_oracle']:.3f} | {_fmt(row['captured_headroom'])} | {row['harm']:+.3f} | "
                   f"{_fmt(row.get('harm_vs_upper_bound'), '+.3f')} | "
                   f"{row['distinct_prompts']} | {_fmt(gate.get('lower_bound'), '+.4f')} |")
    return "\n".join(out)


def summarize(rows: list[dict], learner: str) -> dict:
    mine = [r for r in rows if r["learner"] == learner and "index" in r]
    h = [r["captured_headroom"] for r in mine if learnable(r) and not math.isnan(r["captured_headroom"])]
    harm = [r["harm"] for r in mine if is_null(r)]
    harm_in_budget = [r["harm"] for r in mine if is_null(r) and in_budget(r)]
    return {"learner": learner, "rules": len(mine), "learnable_rules": len(h), "null_rules": len(harm),
            "null_rules_in_budget": len(harm_in_budget),
            "median_captured_headroom": float(np.median(h)) if h else None,
            "min_captured_headroom": float(np.min(h)) if h else None,
            "max_null_harm": float(np.max(harm)) if harm else None,
            "max_null_harm_in_budget": float(np.max(harm_in_budget)) if harm_in_budget else None,
            "max_null_harm_vs_upper_bound": max((r["harm_vs_upper_bound"] for r in mine if is_null(r)), default=None),
            "learnable_served_policy": sum(r["served"] == "policy" for r in mine if learnable(r)),
            "null_served_fixed": sum(r["served"] == "fixed" for r in mine if is_null(r)),
            "passes": bool(h) and float(np.median(h)) >= 0.8 and float(np.min(h)) >= 0.3
                      and (not harm_in_budget or float(np.max(harm_in_budget)) <= MAX_NULL_HARM),
            "every_null_rule_within_bar": not harm or float(np.max(harm)) <= MAX_NULL_HARM}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    series: dict[str, dict[int, list]] = {}
    for row in rows:
        if not learnable(row) or not row.get("curve"):
            continue
        for budget, point in row["curve"].items():
            series.setdefault(row["learner"], {}).setdefault(int(budget), []).append(point["captured_headroom"])
        if row["learner"] == "thompson":
            for budget, share in row["told_curve"].items():
                series.setdefault("told-group bandit (users optimal)", {}).setdefault(int(budget), []).append(share)
    if not series:  # no row ran with the curve (--no-curve): no figure
        plt.close(fig)
        return
    for name, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [np.nanmedian(points[x]) for x in xs], marker="o", label=name)
    ax.axhline(0.8, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("median captured headroom H (learnable rules)")
    ax.set_title("Sample efficiency on the planted rule family")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


DEFINITIONS = """Columns: *told bandit*, the share of test users a Thompson bandit TOLD each user's group serves their best
prompt with the same budget (a rule is *learnable* when it is >= 0.95); *probe lin / mlp*, a supervised linear and
one-hidden-layer probe of the user rows, trained on the training users' true groups, scored on the test users;
*served*, what the run serves after its safe-improvement gate (docs/learner.md); *H*, captured headroom
(served - best fixed) / (oracle - best fixed), against the best fixed prompt chosen with the test users' labels
(an upper bound, so H is conservative); *harm*, (reference - served) / reference, where the reference is the best
fixed prompt chosen on the run's validation users (gate_users of them, every combination of the rule's agents),
scored on the test users, the reference a benchmark user gets; *harm vs upper bound*, the same against the
label-chosen best fixed prompt, which selects on the test users' own noise and group shares (on a 5-group null
rule, the fixed prompt best for the training users scored 12% below it); *gate LCB*, the gate's one-sided 95%
lower bound of (policy - fixed) NDCG@10 on the validation users. *null, beyond budget*: a null rule whose groups'
best prompts the told bandit does not find (< 0.95) with the budget, so no learner can be expected to find the best
fixed prompt, which is one of them (e.g. a group prompt joint over all four agents is 1 of 1,050 whole prompts: 768
uniform samples try it on a user of its group with probability about 1 - (1 - 1/1050)^768 = 0.52). The bar: median
H >= 0.8 and min H >= 0.3 over learnable rules, harm <= 0.02 on every null rule within the budget; the harm of the
others is reported beside it ("max null harm, all")."""


EARLIER = """## Earlier learners (frozen rows; their code and raw records are in git: commits 72e27e9, 672f3f1, db8e263, 9f08aa6, 033f33a, e9bae27, ec52314, 90268dc and e2e40b6)

| learner | genre rules, history + reasoning (768 steps, 300 test users) | other rules |
|---|---|---|
| today's learner with the gate's fixed prompt searched on 50 training users (as many as gate users), not all 200 (e2e40b6; its rows are in planted.jsonl before this change) | 6 of 6 pass: 2 groups 1.000 / 1.000 / 0.993, 4 groups 0.963 / 0.980 / 0.987 | family seed 20261207: median H 0.89, min 0.46, null harm +0.014; held-out (planted-heldout.md), the 13 null rules within the budget, harm with 50 -> 200 search users: 2/1 -0.036 -> -0.066, 2/2 -0.084 -> -0.089, 2/5 -0.079 -> -0.079, 2/8 +0.023 -> -0.021, 2/17 -0.047 -> -0.079, 3/1 +0.016 -> -0.122, 3/10 -0.141 -> -0.141, 3/14 -0.069 -> -0.068, 3/18 +0.029 -> -0.019, 4/9 -0.088 -> -0.089, 4/10 +0.014 -> -0.101, 4/11 -0.024 -> -0.073, 4/12 -0.007 -> -0.090: with 50, max +0.029, above 2% on 2, mean -0.038; on all 200 users max -0.019, above 2% on none, mean -0.080: 10 better, 1 worse, Wilcoxon p = 0.003 |
| today's learner with the gate's search started from the head's FIVE population-best whole prompts, not one (fd19b68; rows in ec52314 and 90268dc) | unchanged: 6 of 6 pass | family seed 20261207 unchanged (median H 0.89, min 0.46, null harm +0.014) but for a null rule beyond the budget (harm +0.232 -> +0.201); held-out (planted-heldout.md's 33 rules): learnable rules unchanged, 8 of 17 null rules moved, 3 better and 5 worse: in budget +0.016 -> -0.101, -0.036 -> -0.062, -0.069 -> -0.066, -0.084 -> -0.079, +0.029 -> +0.045 (max in budget +0.029 -> +0.045); beyond it +0.499 -> +0.484, +0.352 -> +0.383, +0.379 -> +0.413. Not kept |
| thompson with the reward noise estimated but one prior sd per AGENT and block (72e27e9; its rows were planted-noise.md) | 2 groups seeds 0-2: 1.000 / 0.997 / 1.000; 4 groups seeds 0-2: 0.963 / 0.980 / 0.930: 5 of 6 pass | - |
| thompson with one prior sd per AGENT (shared by its actions) and block, and an assumed reward noise sd 0.2 (672f3f1) | 2 groups seeds 0-2: 1.000 / 1.000 / 1.000; 4 groups seeds 0-2: 0.943 / 0.977 / 0.637 (served fixed, gate bound -0.007): 4 of 6 pass | family seed 20261207: median H 0.94, min H 0.32 (mean_rating g3 role+history joint, 0.593 of users optimal; genre g5 history+reasoning H 0.68), max null harm +0.014; ablations on rules 8, 10, 14, 16, 18: state row off H 0.75 / 0.93 / 0.99 / 0.86 / 1.08, GRU off 0.73 / 0.92 / 0.97 / 0.86 / 1.09 (full 0.74 / 0.94 / 0.97 / 0.87 / 1.07) |
| the same with the EARLIER gate (its fixed prompt searched on the same validation users it was compared on; db8e263) | 2 groups seeds 0-2: 1.000 / 1.000 / 1.000; 4 groups seeds 0-2: 0.943 / 0.977 / 0.637 (served fixed, gate bound -0.025): 4 of 6 pass | family seed 20261207: median H 0.94, min H 0.02 (genre g5 history+reasoning served a fixed prompt: the policy was ahead by +0.050 on the validation users, bound -0.005; with the fixed prompt searched on training users (672f3f1) it served the policy, H 0.68), null harm -0.004 |
| thompson with a PER-AGENT head (no pairwise interactions: each agent's model counted the others' choices as noise; block scales by empirical Bayes shared by all agents; 9f08aa6) | 2 groups seeds 0-2: 1.000 / 0.613 (served fixed, gate bound -0.013) / 1.000; 4 groups seeds 0-2: 0.983 / 0.890 / 0.983: 4 of 6 pass | family seed 20261206, 20 rules (11 learnable, 2 null): median H 0.75, min H -0.13, max null harm 0.055: every additive rule served the policy (H 0.62-1.08); both joint learnable rules were served a fixed prompt (H -0.13, -0.01); a joint null rule over three agents served a fixed prompt 5.5% below the reference |
| thompson with ONE fixed prior scale for every feature block (group_sd 0.3, share_sd 0.03, noise_sd 0.3; e9bae27) | - | family seed 20261205, 20 rules (9 learnable, 8 null): median H 0.74, min H -0.61, max null harm 0.481: every single-agent rule served the policy (H 0.74-0.97), every rule over 2-3 agents was missed (H -0.61 to 0.49); a joint null rule over three agents served a fixed prompt 48% below the reference. The block scales by empirical Bayes and the gate's whole-prompt starts were developed on five of these rules (2, 3, 4, 5, 8), so seed 20261205 is no longer a held-out family |
| PPO alone (gamma 0.9, lr 3e-4; the config default until 033f33a) | 2 groups: majority group only, 0.63-0.73 of users optimal | - |
| evidence pooling, `wide_genre` (ml100k.yaml until 033f33a): per-agent linear evidence model, rollouts drawn from it, actors distilled from it | 2 groups seeds 0-2: 0.980 / 0.987 / 0.993; 4 groups seeds 0-2: 0.980 / 0.973 / 0.987; 4 groups seeds 0-11: 9 of 12 pass, mean 0.959 | 3 groups by a numeric feature on two other agents: 0.35 / 0.46 / 0.31 of users optimal, H 0.12 / 0.33 / 0.21; null rule: 39-46 distinct prompts, 13% and 11% below the best fixed prompt |
| its evidence model alone, served greedily | 4 groups seeds 0-11: 11 of 12 pass, mean 0.979 | - |
"""
"""The record of the learners this one replaced, kept as numbers (they are not rerunnable from this script)."""


def older_gate_notes(rows: list[dict]) -> list[str]:
    """One paragraph per way a recorded row's gate differs from today's, naming the rows, so that none is read as
    made by today's gate: the EARLIER gate (no search split recorded: its fixed prompt was searched on the
    validation users, before a6e2147) and a search on fewer training users than all (their command sets
    train.gate_search_users, which reproduces them)."""
    earlier: dict[str, list[int]] = {}
    fewer: dict[str, int] = {}
    for r in rows:
        if "index" in r and r.get("gate") and not r["gate"].get("search_split"):
            earlier.setdefault(r["learner"], []).append(r["index"])
        if "gate_search_users=" in r.get("command", ""):
            fewer[r["learner"]] = fewer.get(r["learner"], 0) + 1
    notes = []
    if earlier:
        notes.append("Rows gated by the EARLIER gate, whose fixed prompt was searched on the validation users it "
                     "was then compared on (biased toward the fixed prompt): " + "; ".join(
                         f"{name} rules {', '.join(map(str, sorted(indices)))}" for name, indices in earlier.items())
                     + ". The others search it on training users.")
    if fewer:
        users = sorted({m for r in rows for m in re.findall(r"gate_search_users=(\d+)", r.get("command", ""))})
        notes.append(f"Rows whose gate searched its fixed prompt on {' or '.join(users)} training users, not all "
                     "(their command says so): " + "; ".join(f"{name} {fewer[name]}" for name in LEARNERS
                                                             if name in fewer)
                     + " rows. The others search every training user.")
    return notes


def write(rows: list[dict], out: Path, header: str) -> None:
    share_references(rows)
    summaries = [summarize(rows, name) for name in LEARNERS if any(r["learner"] == name for r in rows)]
    lines = [header, "", DEFINITIONS, "", "## Summary (family rules; H over learnable rules, harm over null rules)", "",
             "| learner | rules | learnable | null (in budget) | median H | min H | max null harm, in budget "
             "| max null harm, all | null rules served fixed | meets the bar |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['learner']} | {s['rules']} | {s['learnable_rules']} | {s['null_rules']} "
                     f"({s['null_rules_in_budget']}) | {_fmt(s['median_captured_headroom'])} | "
                     f"{_fmt(s['min_captured_headroom'])} | {_fmt(s['max_null_harm_in_budget'], '+.3f')} | "
                     f"{_fmt(s['max_null_harm'], '+.3f')} | {s['null_served_fixed']} | {s['passes']} |")
    for note in older_gate_notes(rows):
        lines += ["", note]
    bar = [r for r in rows if "index" not in r]
    if bar:
        lines += ["", "## Genre pass bar (>= 95% of users optimal and >= 95% of the oracle's NDCG)", "",
                  table(bar)]
    lines += ["", "## Rules", "", table([r for r in rows if "index" in r]), "", EARLIER]
    out.write_text("\n".join(lines))
    summary_path = out.with_name(out.stem + "-family.json")
    main_summary = next((s for s in summaries if s["learner"] == "thompson"), summaries[0] if summaries else {})
    summary_path.write_text(json.dumps({**main_summary, "by_learner": summaries}, indent=2) + "\n")
    plot(rows, out.with_name(out.stem + "-curve.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/ml100k.yaml")
    parser.add_argument("--family", type=int, default=0, help="draw this many family rules")
    parser.add_argument("--family-seed", type=int, default=20261206)
    parser.add_argument("--genre-bar", action="store_true", help="run the genre pass bar (6 runs)")
    parser.add_argument("--learners", nargs="+", default=["thompson", "ppo"], choices=list(LEARNERS))
    parser.add_argument("--rules", nargs="+", type=int, help="only these family rule indices")
    parser.add_argument("--no-curve", action="store_true", help="skip the sample-efficiency curve")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="experiments/results/planted.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small nets)")
    parser.add_argument("--replot", action="store_true", help="rebuild the table from <out>.jsonl only")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    jsonl = out.with_suffix(".jsonl")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.is_file() else []
    command = f"python experiments/bench_planted.py {' '.join(sys.argv[1:])}"

    def header() -> str:
        commands = sorted({r.get("command", "") for r in rows} - {""})
        seeds = sorted({m for c in commands for m in re.findall(r"--family-seed (\d+)", c)}) or [str(args.family_seed)]
        return ("# The planted check of the learner\n\nMade by (raw rows in `" + jsonl.name + "`; family seed"
                f"{'s' * (len(seeds) > 1)} {', '.join(seeds)}, never used in development):\n\n"
                + "\n".join(f"    {c}" for c in commands))
    if not args.replot:
        jobs = []
        if args.family:
            for i, rule in enumerate(draw_family(args.family, args.family_seed)):
                if args.rules is None or i in args.rules:
                    jobs += [(rule, 0, learner, i) for learner in args.learners]
        if args.genre_bar:
            jobs += [(rule, seed, "thompson", None) for rule, seed in genre_bar()]
        done = {(json.dumps(r["rule_spec"], sort_keys=True), r["seed"], r["learner"]) for r in rows}
        for rule, seed, learner, index in jobs:
            if (json.dumps(rule, sort_keys=True), seed, learner) in done:
                continue
            row = run(rule, seed, learner, args.config, args.overrides,
                      curve=index is not None and not args.no_curve and learner in ("thompson", "ppo"))
            row["command"] = command
            if index is not None:
                row["index"] = index
            rows.append(row)
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{rule_name(row)} seed {seed} {learner}: served {row['served']}, optimal "
                  f"{row['optimal_share']:.3f}, H {_fmt(row['captured_headroom'])}, harm {row['harm']:+.3f}, "
                  f"told {_fmt(row.get('bandit_told_group'))}, {row['wall_s']:.0f} s", flush=True)
            write(rows, out, header())
    write(rows, out, header())


if __name__ == "__main__":
    main()
