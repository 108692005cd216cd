"""The learner's benchmark: can the four agents find a planted user-by-action interaction with a real budget?

For each variant of the learner, each planted rule (2 and 4 user groups) and each seed, train with the whole
budget of a config (default experiments/ml100k.yaml: 768 environment steps) against the planted ranker
(llm.backend: planted, rpp/llm/planted.py) and evaluate greedily on the config's test users. Pass bar: >= 95% of
users get their group's best actions and mean NDCG >= 95% of the planted oracle.

    python experiments/bench_planted.py                       # the recorded table: experiments/results/planted.md
    python experiments/bench_planted.py --variants final --seeds 0 --groups 2   # one quick run

Variants replay the changes made to the learner, each on top of the previous one, so the table shows what each
change bought. Rows are appended to the .jsonl next to the table as they finish (a long run can be read early).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rpp.agents.planted import passes, planted_check, planted_config  # noqa: E402
from rpp.config import load_config  # noqa: E402

EVIDENCE_BEFORE = ["train.evidence.model=per_agent", "train.evidence.distill_on=rollout", "train.evidence.explore=0",
                   "train.evidence.explore_beta=1", "train.evidence.noise_sd=0.1", "train.evidence.final_epochs=0"]
"""The evidence settings every variant up to `category` ran with (the code's defaults), pinned because
ml100k.yaml now sets some of them otherwise."""
NO_POOLING = [*EVIDENCE_BEFORE, "train.evidence.coef=0"]
"""ml100k.yaml's learner without evidence pooling (PPO alone)."""
OLD_SETTINGS = ["train.learning_rate=0.003", "train.ent_coef=0.001", "train.ent_coef_final=null", "train.gamma=0.9",
                "train.n_epochs=4", "train.batch_size=24", *NO_POOLING]
"""ml100k.yaml's PPO settings before the learner was fixed."""
CATEGORY = [*EVIDENCE_BEFORE, "train.evidence.coef=1", "train.evidence.category_prior_sd=0.1"]
"""The learner that was in ml100k.yaml before `wide_genre` (variant category, the reference of the paired column),
every evidence setting pinned; the variants after it change some of them (a later override wins)."""

VARIANTS = {
    # name: (description, overrides on top of the config, user row in the observation)
    "before": ("the learner as it was: the old PPO settings (lr 3e-3, ent_coef 0.001 constant, gamma 0.9, 4 epochs, "
               "minibatch 24) and no user row (row 1 zeroed); the episode-end fix (terminated at T) stays in",
               OLD_SETTINGS, False),
    "user_row": ("+ the standardized user-feature row (genre shares, dominant genre, history length, ratings, "
                 "step), same old PPO settings", OLD_SETTINGS, True),
    "final": ("+ exploration that lasts and gentler updates: ent_coef 0.05 annealed linearly to 0, lr 1e-3, 10 "
              "epochs over whole-rollout minibatches (48), gamma 0 (each step judged by its own NDCG): the PPO "
              "settings now in ml100k.yaml, PPO alone", NO_POOLING, True),
    "history_row": ("final + the mean history-title embedding as a second user row (env.history_embedding): an "
                    "ablation of a feature the issue suggested", ["env.history_embedding=true", *NO_POOLING], True),
    "pooled": ("final + evidence pooling (train.evidence, rpp/agents/evidence.py): per agent and action a Bayesian "
               "linear model of the step reward on the user row, fit on every sample of the run; after each PPO "
               "update the actors are pulled toward its Thompson choice probabilities",
               [*EVIDENCE_BEFORE, "train.evidence.coef=1", "train.evidence.category_prior_sd=null"], True),
    "joint": ("pooled with ONE reward model over all four agents' choices (train.evidence.model: joint), each "
              "agent credited with its own part of the reward rather than counting its partners' as noise",
              [*EVIDENCE_BEFORE, "train.evidence.coef=1", "train.evidence.model=joint",
               "train.evidence.category_prior_sd=null"], True),
    "category": ("pooled with a wider prior (sd 0.1 instead of 0.03) on the weights of the user row's one-hot "
                 "columns (the dominant genre; train.evidence.category_prior_sd): each genre's own deviation is "
                 "learnt from that genre's few users instead of being shrunk away: the learner in ml100k.yaml "
                 "until wide_genre",
                 CATEGORY, True),
    "replay": ("category, with each distillation step pulling the rollout's users plus as many drawn from every "
               "earlier rollout toward the evidence (train.evidence.distill_on: all), so that users seen rollouts "
               "ago, a rare genre's few among them, keep being pulled",
               [*CATEGORY, "train.evidence.distill_on=all"], True),
    "explore": ("category, with the rollouts' actions drawn half from the actors and half from the evidence's "
                "Thompson choice probabilities (train.evidence.explore: 0.5), so that users whose evidence is thin "
                "are explored like a bandit explores them; PPO weighs those samples by actor / behaviour probability",
                [*CATEGORY, "train.evidence.explore=0.5", "train.evidence.explore_beta=1"], True),
    "top_two": ("explore with top-two sampling for the evidence's half (train.evidence.explore_beta: 0.5): half "
                "of those draws go to each user's probable runner-up actions, which identifying the best one needs",
                [*CATEGORY, "train.evidence.explore=0.5", "train.evidence.explore_beta=0.5"], True),
    "explore_all": ("explore with every rollout action drawn from the evidence's choice probabilities "
                    "(train.evidence.explore: 1): the actors learn from the evidence only",
                    [*CATEGORY, "train.evidence.explore=1", "train.evidence.explore_beta=1"], True),
    "wide_noise": ("category with a wider assumed reward noise around each agent's model (train.evidence.noise_sd: "
                   "0.3 instead of 0.1): the per-agent model counts the partners' choices as noise, which moves a "
                   "step's reward by up to 0.3, so one unlucky sample no longer rules out a rare genre's best action",
                   [*CATEGORY, "train.evidence.noise_sd=0.3"], True),
    "wide_explore": ("wide_noise with every rollout action drawn from the evidence's choice probabilities "
                     "(train.evidence.explore: 1), as the evidence model alone explores "
                     "(experiments/evidence_bandit.py)",
                     [*CATEGORY, "train.evidence.noise_sd=0.3", "train.evidence.explore=1",
                      "train.evidence.explore_beta=1"], True),
    "wide_replay": ("wide_explore with each distillation step pulling every earlier rollout's users too "
                    "(train.evidence.distill_on: all), so the actors keep matching the evidence for a rare genre's "
                    "few users",
                    [*CATEGORY, "train.evidence.noise_sd=0.3", "train.evidence.explore=1",
                     "train.evidence.explore_beta=1", "train.evidence.distill_on=all"], True),
    "wide_genre": ("wide_replay with the dominant-genre prior widened as well (train.evidence.category_prior_sd: 0.3 "
                   "instead of 0.1), the setting that served the most users with the evidence model alone "
                   "(experiments/results/planted-tuning.md): the learner now in ml100k.yaml",
                   [*CATEGORY, "train.evidence.noise_sd=0.3", "train.evidence.category_prior_sd=0.3",
                    "train.evidence.explore=1", "train.evidence.explore_beta=1", "train.evidence.distill_on=all"],
                   True),
    "genre_final": ("wide_genre plus a final distillation: 200 steps of each actor toward the evidence model's "
                    "greedy choice over every observation of the run (train.evidence.final_epochs: 200), so the "
                    "agents serve what the model says where it knows more than the policy",
                    [*CATEGORY, "train.evidence.noise_sd=0.3", "train.evidence.category_prior_sd=0.3",
                     "train.evidence.explore=1", "train.evidence.explore_beta=1", "train.evidence.distill_on=all",
                     "train.evidence.final_epochs=200"], True),
}


def run(variant: str, groups: int, seed: int, base_path: str, extra: list[str]) -> dict:
    description, overrides, user_rows = VARIANTS[variant]
    base = load_config(base_path, overrides + extra)
    cfg = planted_config(base, groups, seed, tempfile.mkdtemp(prefix="rpp-planted-"))
    from rpp.envs.core import StepCore

    original = StepCore.user_rows
    if not user_rows:  # ablation: the agents see no user row, as before it existed
        StepCore.user_rows = lambda self, sample: np.zeros_like(original(self, sample))
    try:
        start = time.perf_counter()
        result = planted_check(cfg)
        result["wall_s"] = round(time.perf_counter() - start, 1)
    finally:
        StepCore.user_rows = original
    result.update(variant=variant, groups=groups, seed=seed, passed=passes(result),
                  budget=cfg.train.total_steps, steps_per_episode=cfg.env.steps_per_episode)
    result.pop("run_dir", None)
    return result


def references(row: dict, base_path: str, extra: list[str]) -> dict:
    """The bandit references (rpp.agents.planted.bandit_references) of a recorded row's rule, seed and budget."""
    from rpp.agents.planted import bandit_references
    from rpp.llm import make_ranker

    cfg = planted_config(load_config(base_path, VARIANTS[row["variant"]][1] + extra), row["groups"], row["seed"],
                         tempfile.mkdtemp(prefix="rpp-planted-"))
    return bandit_references(cfg, make_ranker(cfg))


def table(rows: list[dict]) -> str:
    lines = ["| variant | groups | seed | users optimal | by group | NDCG / oracle | policy NDCG | oracle | best fixed | "
             "task-wise | distinct prompts | group ceiling | bandit told group | bandit told genre | pass |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        by_group = " / ".join(f"{x:.2f}" for x in r["optimal_share_by_group"])
        told_genre = "-" if r.get("bandit_told_feature") is None else f"{r['bandit_told_feature']:.3f}"
        lines.append(f"| {r['variant']} | {r['groups']} | {r['seed']} | {r['optimal_share']:.3f} | {by_group} | "
                     f"{r['ndcg_vs_oracle']:.3f} | {r['policy_ndcg']:.3f} | {r['oracle_ndcg']:.3f} | "
                     f"{r['best_fixed_ndcg']:.3f} | {r['taskwise_ndcg']:.3f} | {r['distinct_prompts']} | "
                     f"{r['group_ceiling']:.3f} | {r['bandit_told_group']:.3f} | {told_genre} | "
                     f"{'yes' if r['passed'] else 'no'} |")
    return "\n".join(lines)


REFERENCE = "category"
"""The variant every other one is compared with, seed by seed (the learner in ml100k.yaml)."""


def paired_difference(rows: list[dict], variant: str, groups: int) -> str:
    """Mean, range and count of the per-seed difference in users optimal from REFERENCE on the seeds both ran:
    learners that differ only in their settings share a seed's users and nearly all of its first rollout
    (experiments/compare_rollouts.py), so they are compared on the same seeds."""
    reference = {r["seed"]: r["optimal_share"] for r in rows if r["variant"] == REFERENCE and r["groups"] == groups}
    diffs = [r["optimal_share"] - reference[r["seed"]] for r in rows
             if r["variant"] == variant and r["groups"] == groups and r["seed"] in reference]
    if variant == REFERENCE or not diffs:
        return "-"
    if len(diffs) == 1:
        return f"{diffs[0]:+.3f} (1 seed)"
    return f"{np.mean(diffs):+.3f} ({min(diffs):+.3f} .. {max(diffs):+.3f}, {len(diffs)} seeds)"


def summary(rows: list[dict]) -> str:
    lines = ["| variant | groups | seeds passed | mean users optimal | mean NDCG / oracle | users optimal minus "
             f"{REFERENCE}'s, same seeds | bandit told group | bandit told genre |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["variant"], r["groups"]) for r in rows}, key=lambda k: (list(VARIANTS).index(k[0]), k[1]))
    for v, g in keys:
        sel = [r for r in rows if r["variant"] == v and r["groups"] == g]
        genre = [r["bandit_told_feature"] for r in sel if r.get("bandit_told_feature") is not None]
        told_genre = f"{np.mean(genre):.3f}" if genre else "-"
        lines.append(f"| {v} | {g} | {sum(r['passed'] for r in sel)} / {len(sel)} | "
                     f"{np.mean([r['optimal_share'] for r in sel]):.3f} | "
                     f"{np.mean([r['ndcg_vs_oracle'] for r in sel]):.3f} | {paired_difference(rows, v, g)} | "
                     f"{np.mean([r['bandit_told_group'] for r in sel]):.3f} | {told_genre} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/ml100k.yaml")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--groups", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every run (after the variant's)")
    parser.add_argument("--out", default="experiments/results/planted.md")
    parser.add_argument("--merge", nargs="+", metavar="JSONL",
                        help="write the report from rows saved by earlier runs (their .jsonl files) instead of "
                             "running anything; the rows are copied into OUT's own .jsonl")
    args = parser.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".jsonl")
    rows = []
    if args.merge:
        for path in args.merge:
            rows += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        order = list(VARIANTS)
        for r in rows:  # rows recorded before the bandit references existed: they depend on the rule, seed and budget only
            if "bandit_told_group" not in r:
                r.update(references(r, args.config, args.overrides))
        rows.sort(key=lambda r: (order.index(r["variant"]), r["groups"], r["seed"]))
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))
        args.variants = [v for v in order if any(r["variant"] == v for r in rows)]
    else:
        log.write_text("")
    for variant in args.variants if not args.merge else []:
        for groups in args.groups:
            for seed in args.seeds:
                row = run(variant, groups, seed, args.config, args.overrides)
                rows.append(row)
                with log.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{variant} groups={groups} seed={seed}: users optimal {row['optimal_share']:.3f}, NDCG / "
                      f"oracle {row['ndcg_vs_oracle']:.3f}, {row['distinct_prompts']} distinct prompts "
                      f"({row['wall_s']:.0f} s)", flush=True)

    rule = rows[0]["rule"]
    text = [
        "# The planted-interaction check of the learner",
        "",
        "Command: `python experiments/bench_planted.py --config " + args.config
        + "".join(f" --set {o}" for o in args.overrides)
        + (" --merge " + " ".join(args.merge) if args.merge else "") + "`",
        "",
        f"Budget: {rows[0]['budget']} environment steps (the config's), T = {rows[0]['steps_per_episode']}; "
        f"evaluated greedily on {rows[0]['n_users']} held-out test users. Rule (rpp.config.PlantedConfig): agents "
        f"{rule['agents']} matter, groups by {rule['feature']}, interaction {rule['interaction']}, effect "
        f"{rule['effect']}, user main effect U[{rule['main_low']}, {rule['main_high']}], noise {rule['noise']}. Pass: >= 95% of "
        "users get their group's best actions AND mean NDCG >= 95% of the planted oracle (every user with their "
        "group's best actions). 'best fixed' is the best single prompt for everyone, chosen WITH the labels of "
        "the same users (an upper bound for any one-prompt-for-all method). 'group ceiling': accuracy on the test "
        "users of a softmax regression trained on the training users' observation rows WITH their true group "
        "labels (rpp.agents.planted.feature_ceiling): what the observation allows at best; the learner never "
        "sees the labels. 'bandit told group' / 'bandit told genre': with the same budget and reward, a Thompson-"
        "sampling learner per agent that is TOLD each user's group, or only the dominant genre that defines the "
        "groups (rpp.agents.planted.bandit_references): whether the budget holds the evidence at all.",
        "",
        "Variants (each adds to the one above):",
        "",
        *[f"- **{v}**: {VARIANTS[v][0]}" for v in args.variants],
        "",
        "## Summary",
        "",
        summary(rows),
        "",
        "## Every run",
        "",
        table(rows),
        "",
        f"Raw rows: `{log.name}`.",
        "",
    ]
    out.write_text("\n".join(text))
    print(out.read_text())


if __name__ == "__main__":
    main()
