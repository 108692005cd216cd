"""Where does the pooled learner lose a planted group: the policy, its evidence model, or the samples themselves?

Trains the learner of a config (default experiments/ml100k.yaml, evidence pooling on) against a planted rule, then,
for each user group, the share of test users given the group's best actions by
- the policy (greedy, first step),
- the evidence model fit on every sample of the run (its most probable best action per agent),
- per-dominant-genre mean rewards of the SAME samples (what a learner that knew the genre mattered could read
  from them; the planted groups are unions of dominant genres).

    python experiments/diagnose_pooled.py --groups 4 --seeds 0 1   # experiments/results/planted-pooled-diagnosis.md
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rpp.agents.checkpoints import latest_checkpoint, load_state  # noqa: E402
from rpp.agents.planted import planted_check, planted_config  # noqa: E402
from rpp.agents.serving import load_algorithm  # noqa: E402
from rpp.config import load_config  # noqa: E402
from rpp.envs import StateEncoder, make_core  # noqa: E402
from rpp.envs.features import dominant_genre  # noqa: E402
from rpp.llm import make_ranker  # noqa: E402
from rpp.prompts import PATTERNS  # noqa: E402


def diagnose(cfg) -> dict:
    run_dir = Path(planted_check(cfg, references=False)["run_dir"])
    checkpoint = latest_checkpoint(run_dir)
    samples = load_state(checkpoint)["evidence"]["samples"]
    ranker = make_ranker(cfg)
    encoder = StateEncoder(cfg.encoder)
    train_core, core = (make_core(cfg, split, ranker=ranker, encoder=encoder) for split in ("train", "test"))
    model = load_algorithm(cfg, checkpoint)
    _, obs = core.reset(core.samples)
    policy = [p.argmax(1) for p in model.policy.agent_probs(obs)]
    evidence = model.evidence  # built by the learner itself from the run's settings (priors, category columns)
    evidence.load_state(samples)
    modelled = [p.argmax(1) for p in evidence.choice_probs(obs[:, 1], np.random.default_rng(cfg.seed))]

    # the dominant genre of each pooled sample's user, matched through the user row (rows are unique per user)
    genre_of_row = {train_core.user_rows(s)[0].tobytes(): dominant_genre(core.dataset.genres(i) for i in s.history)
                    for s in train_core.samples}
    row_slots = samples["x"].copy()
    row_slots[:, -1] = 0.0  # the step slot is the environment's, not the user's
    sample_genre = np.array([genre_of_row.get(r.astype(np.float32).tobytes()) for r in row_slots], dtype=object)
    ids = {p: [a.id for a in ranker.action_set.actions[p]] for p in PATTERNS}

    def genre_means_choice(genre, agent: int) -> int:
        means = []
        for a in range(len(ids[PATTERNS[agent]])):
            rows = (sample_genre == genre) & (samples["actions"][:, agent] == a)
            means.append(samples["rewards"][rows].mean() if rows.any() else -np.inf)
        return int(np.argmax(means))

    by_group: dict[int, list[tuple[bool, bool, bool]]] = {}
    for k, s in enumerate(core.samples):
        best = ranker.optimal_actions(s.user)
        genre = dominant_genre(core.dataset.genres(i) for i in s.history)
        hit = [all(ids[p][choice[PATTERNS.index(p)][k]] == best[p] for p in ranker.rule.agents)
               for choice in (policy, modelled)]
        hit.append(all(ids[p][genre_means_choice(genre, PATTERNS.index(p))] == best[p] for p in ranker.rule.agents))
        by_group.setdefault(ranker.group[s.user], []).append(tuple(hit))
    return {"matched_samples": float(np.mean(sample_genre != None)),  # noqa: E711
            "groups": {g: np.mean(v, axis=0).round(3).tolist() + [len(v)] for g, v in sorted(by_group.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/ml100k.yaml")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run")
    parser.add_argument("--out", default="experiments/results/planted-pooled-diagnosis.md")
    args = parser.parse_args()
    lines = ["# Where the pooled learner loses a planted group", "",
             f"Command: `python experiments/diagnose_pooled.py --config {args.config} --groups {args.groups} --seeds "
             + " ".join(map(str, args.seeds)) + "".join(f" --set {o}" for o in args.overrides) + "`", "",
             "Share of each group's test users given the group's best actions (greedy, first step) by the policy, by "
             "the evidence model fit on every sample of the run, and by per-dominant-genre mean rewards of the SAME "
             "samples (a learner told which feature matters).", "",
             "| seed | group | users | policy | evidence model | genre means of the same samples |",
             "|---|---|---|---|---|---|"]
    for seed in args.seeds:
        cfg = planted_config(load_config(args.config, args.overrides), args.groups, seed,
                             tempfile.mkdtemp(prefix="rpp-diagnose-"))
        result = diagnose(cfg)
        if result["matched_samples"] < 1.0:
            raise SystemExit(f"only {result['matched_samples']:.1%} of the pooled samples matched a training user")
        for g, (pol, mod, gen, n) in result["groups"].items():
            lines.append(f"| {seed} | {g} | {n} | {pol:.2f} | {mod:.2f} | {gen:.2f} |")
        print("\n".join(lines[-len(result["groups"]):]), flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
