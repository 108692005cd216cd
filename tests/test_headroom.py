"""`rpp headroom` end to end on the planted ranker (no model call): known answers in, the right verdict out."""
import json

import numpy as np

from rpp.benchmark import headroom as H
from rpp.benchmark.headroom_run import run_headroom
from rpp.cli import main
from rpp.config import load_config

# Three roles, one action for every other pattern: the headroom's 3 prompts are all 3 combinations, so each
# planted group's best prompt is among them and the task-wise prompt (role none) is one group's best.
SMALL_ACTIONS = """
role:
  - {id: none, text: ""}
  - {id: recommender, text: "You are a recommender system that predicts which {item_noun} a person will choose next."}
  - {id: expert, text: "You are an expert on {item_noun_plural} who knows which ones appeal to the same audience."}
history:
  - {id: recent_15, text: "The {n_history} {item_noun_plural} this user chose, oldest first:", params: {window: 15}}
reasoning:
  - {id: none, text: ""}
format:
  - {id: none, text: ""}
"""


def _cfg(tmp_path, feature, *extra):
    actions = tmp_path / "actions.yaml"
    actions.write_text(SMALL_ACTIONS)
    return load_config("experiments/ml100k.yaml", [
        "llm.backend=planted", f"prompt.action_spaces={actions}", "llm.planted.agents=[role]",
        "llm.planted.groups=3", f"llm.planted.feature={feature}", "llm.planted.noise=0.05",
        "headroom.users=150", "headroom.prompts=3", "headroom.items=4", "headroom.feature_buckets=3",
        "headroom.n_bootstrap=300", f"headroom.output_dir={tmp_path / 'out'}", *extra])


def test_a_learnable_planted_rule_is_reliable_and_says_train(tmp_path):
    """Groups by history length (a feature of the user's state): each group's best role repeats across the
    user's items and can be learned from other users of the same group, while no single role is best for all."""
    out = run_headroom(_cfg(tmp_path, "history_length"), progress=lambda msg: None)
    rec = json.loads((out / "headroom.json").read_text())
    assert rec["verdict"] == H.TRAIN, rec["numbers"]
    assert rec["reliability"]["user_prompt"]["spearman_brown"]["low"] > 0.8
    g = rec["gains"]
    assert g["per_user"]["low"] > 0.1 and g["state_vs_fixed"]["low"] > 0.05
    assert "history_length" in g["state_features"]
    assert g["oracle"]["value"] >= g["per_user"]["value"]
    assert np.asarray(rec["ndcg"]).shape == (150, 3, 4)
    assert (out / "headroom.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert H.TRAIN in report and "upper bound" in report.lower()
    assert rec["cost"]["requests"] == 150 * 3 * 4 and rec["cost"]["training_estimate"]["requests"] > 0


def test_a_null_planted_rule_says_keep(tmp_path):
    """Groups by a hash of the user id, which nothing observable reveals: a user's best role repeats across its
    items (split-half reliability stays high, and picking per user on half A gains on half B), but no policy reading
    the state can find it, and every role is the best for about a third of the users, so no fixed prompt wins."""
    cfg = _cfg(tmp_path, "user_hash")
    from rpp.llm import make_ranker

    ranker = make_ranker(cfg)
    # the known answer: with noise off, the best fixed prompt's true gain over the task-wise one is small
    users = [u for u in ranker.by_user]
    true = [np.mean([ranker.ndcg(u, {"role": r, "history": "recent_15", "reasoning": "none", "format": "none"},
                                 noise=False) for u in users]) for r in ("none", "recommender", "expert")]
    assert max(true) - true[0] < 0.03
    out = run_headroom(cfg, ranker=ranker, progress=lambda msg: None)
    rec = json.loads((out / "headroom.json").read_text())
    assert rec["verdict"] == H.KEEP, rec["numbers"]
    g = rec["gains"]
    assert g["state_vs_fixed"]["low"] < 0 < g["state_vs_fixed"]["high"] or g["state_vs_fixed"]["high"] < 0
    assert g["per_user"]["low"] > 0.1  # the effect is real per user; the verdict is about what a policy can use
    assert "no observable feature predicts them" in rec["numbers"]


def test_holdout_requests_carry_their_own_target_to_the_planted_ranker(tmp_path):
    """The planted ranker places the HOLDOUT's target (not the split's) at the rank its rule says."""
    from rpp.benchmark.methods import BenchContext
    from rpp.data import load_dataset, split_users
    from rpp.llm import make_ranker
    from rpp.metrics import target_rank

    cfg = _cfg(tmp_path, "history_length", "llm.planted.noise=0")
    dataset = load_dataset(cfg.data)
    split = split_users(dataset, cfg.data, cfg.seed)
    ranker = make_ranker(cfg)
    ctx = BenchContext(cfg=cfg, dataset=dataset, fit_users=[], train_interactions=split.train_interactions,
                       ranker_factory=lambda: ranker)
    user = split.train[0]
    hold = ctx.history_holdout(user, len(user.history) - 2, tag="t")
    actions = {"role": "expert", "history": "recent_15", "reasoning": "none", "format": "none"}
    from rpp.benchmark.methods import chosen_actions

    chosen = chosen_actions(ctx.builder, [2, 0, 0, 0])
    (r,) = ctx.rank_samples([hold], [chosen])
    want = ranker.target_rank(ranker.quality(user.user, actions, noise=False), len(hold.candidates)) - 1
    assert target_rank(r.order, hold.target_index) == want


def test_cli_refuses_too_few_users_clearly(tmp_path, capsys):
    actions = tmp_path / "a.yaml"
    actions.write_text(SMALL_ACTIONS)
    rc = main(["headroom", "--config", "experiments/ml100k.yaml", "--items", "5000", "--out", str(tmp_path),
               "--set", "llm.backend=planted", "--set", f"prompt.action_spaces={actions}"])
    assert rc == 2
    assert "more than 5000 history items" in capsys.readouterr().err
