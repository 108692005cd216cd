"""train / evaluate / serving / ranker check on the REAL environment (ML-100K users, real prompts, the real
MiniLM state encoder, the batched VecEnv), with a deterministic stand-in ranker so these run in seconds.
The same paths with the real SmolLM2 ranker are in test_agents_llm.py."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch as th
import yaml
from helpers import shuffled_target_rollouts
from stable_baselines3.common.callbacks import BaseCallback

from rpp.config import ConfigError, load_config
from rpp.llm.base import Ranker, Ranking

pytestmark = pytest.mark.usefixtures("one_thread")


class PromptHashRanker(Ranker):
    """Ranks candidates by a hash of (prompt, title): deterministic, depends on every word of the prompt (so on
    every agent's action) and knows nothing about targets. A test double for the LLM, not a model of one."""

    identity = "test-prompt-hash"

    def rank(self, requests):
        out = []
        for req in requests:
            text = json.dumps(req.messages, sort_keys=True)
            scores = [int.from_bytes(hashlib.sha256(f"{text}\x00{c}".encode()).digest()[:4], "little") / 2 ** 32
                      for c in req.candidates]
            order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
            out.append(Ranking(order=order, scores=scores, prompt_tokens=len(text) // 4))
        self.usage.record(out)
        return out


class PresentedOrderRanker(Ranker):
    """Returns every candidate list as presented: a ranker at chance level (the target's slot is random)."""

    identity = "test-presented-order"

    def rank(self, requests):
        out = [Ranking(order=list(range(len(r.candidates)))) for r in requests]
        self.usage.record(out)
        return out



_TINY_OVERRIDES = (
    "data.n_train_users=8", "data.n_val_users=8", "data.n_test_users=6",
    "env.n_envs=4", "env.steps_per_episode=2", "train.n_steps=2", "train.batch_size=8",
    "train.hidden_size=16", "train.total_steps=24", "train.check_users=0", "train.learning_rate=0.003",
)


def tiny_cfg(tmp_path: Path, name: str, *extra: str):
    return load_config(None, [f"name={name}", f"train.runs_dir={tmp_path / 'runs'}", *_TINY_OVERRIDES, *extra])


class InitialParameters(BaseCallback):
    """Records the policy's parameters when training starts."""

    def _on_training_start(self) -> None:
        self.initial = {k: v.clone() for k, v in self.model.policy.state_dict().items()}

    def _on_step(self) -> bool:
        return True


@pytest.mark.slow
def test_default_learner_trains_and_writes_a_complete_run_dir(tmp_path):
    from rpp.agents import train
    from rpp.agents.learner import ThompsonPPO

    cfg = tiny_cfg(tmp_path, "default", "train.check_users=6")
    assert cfg.train.learner == "thompson"
    snapshot = InitialParameters()
    ranker = PromptHashRanker()
    run_dir = train(cfg, ranker=ranker, progress=False, callbacks=[snapshot])
    assert run_dir == tmp_path / "runs" / "default"
    for name in ("config.yaml", "actions.yaml", "metrics.jsonl", "usage.json", "learning_curve.png",
                 "ranker_check.json", "gate.json", "checkpoints/latest"):
        assert (run_dir / name).is_file(), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for p in ("role", "history", "reasoning", "format"):  # each agent's distribution is logged separately
        assert {f"agents/{p}/entropy", f"agents/{p}/p_argmax"} <= tags
    assert len(events.Scalars("agents/role/entropy")) == 3  # one point per rollout
    assert {"rollout/mean_reward", "rollout/mean_ndcg", "llm/calls", "llm/cache_hits", "llm/calls_per_s"} <= tags
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["timesteps"] for r in rows] == [8, 16, 24]  # 4 envs x 2 steps per rollout, 3 rollouts
    for r in rows:
        assert set(r["entropy"]) == {"role", "history", "reasoning", "format"}
        assert all(abs(sum(p.values()) - 1) < 1e-4 for p in r["mean_probs"].values())
        assert r["llm_calls"] >= 8  # the steps (+ task-wise baselines of new users)
    usage = json.loads((run_dir / "usage.json").read_text())
    gate = json.loads((run_dir / "gate.json").read_text())
    # every ranker call is accounted: the 6 ranker-check users, each rollout's steps and baselines, and the gate's
    assert usage["llm"]["calls"] == sum(r["llm_calls"] for r in rows) + 6
    assert ranker.usage.snapshot().calls == usage["llm"]["calls"] + gate["llm_calls"] and gate["llm_calls"] > 0
    assert gate["served"] in ("policy", "fixed") and gate["n_users"] == 8
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["learner"] == "thompson"

    model = ThompsonPPO.load(run_dir / "checkpoints" / "rollout-000003" / "model.zip")
    assert model.num_timesteps == 24
    final = model.policy.state_dict()
    changed = [name for name, value in snapshot.initial.items() if not th.equal(value, final[name])]
    # every agent's GRU, user encoder and head, and the critic, were updated
    for part in [f"mlp_extractor.agents.{i}.{net}" for i in range(4) for net in ("ranking.gru", "user")] \
            + [f"action_net.heads.{i}" for i in range(4)] \
            + ["mlp_extractor.critic", "value_net"]:
        assert any(name.startswith(part) for name in changed), part

    # evaluate applies the gate's decision and says what it served
    from rpp.agents import evaluate

    served = evaluate(run_dir, steps=1, n_users=4, ranker=ranker)
    assert served.served == gate["served"] and served.served_reason == gate["reason"]
    fixed = {**gate, "served": "fixed", "reason": "test", "fixed_indices": [1, 0, 1, 0]}
    (run_dir / "gate.json").write_text(json.dumps(fixed))
    result = evaluate(run_dir, steps=1, n_users=4, ranker=ranker)
    assert result.served == "fixed" and "served: the fixed prompt (test)" in result.table()
    ids = {p: list(counts) for p, counts in result.action_counts.items()}
    for p, i in zip(("role", "history", "reasoning", "format"), fixed["fixed_indices"]):
        assert result.action_counts[p][ids[p][i]] == 4


@pytest.mark.slow
def test_custom_action_set_with_7_roles_and_3_formats_trains_without_code_changes(tmp_path):
    from rpp.agents import PromptPolicy, evaluate, train

    actions = {
        "role": [{"id": f"role{i}", "text": f"You are assistant number {i} who recommends {{item_noun_plural}}."}
                 for i in range(7)],
        "history": [{"id": "last5", "text": "The user's last {n_history} {item_noun_plural}:",
                     "params": {"window": 5}},
                    {"id": "last12", "text": "The user's last {n_history} {item_noun_plural}, rated:",
                     "params": {"window": 12, "ratings": True}}],
        "reasoning": [{"id": "none", "text": ""}, {"id": "taste", "text": "Match the user's taste."}],
        "format": [{"id": "title", "text": "Answer with a title."}, {"id": "none", "text": ""},
                   {"id": "year", "text": "Include the year."}],
    }
    path = tmp_path / "my_actions.yaml"
    path.write_text(yaml.safe_dump(actions, sort_keys=False))
    cfg = tiny_cfg(tmp_path, "custom", f"prompt.action_spaces={path}", "train.total_steps=16")
    ranker = PromptHashRanker()
    run_dir = train(cfg, ranker=ranker, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert list(rows[-1]["mean_probs"]["role"]) == [f"role{i}" for i in range(7)]
    assert list(rows[-1]["mean_probs"]["format"]) == ["title", "none", "year"]
    path.unlink()  # the run keeps its own copy of the action set
    policy = PromptPolicy.load(run_dir)
    assert list(policy.model.action_space.nvec) == [7, 2, 2, 3]
    choice = policy.choose(["Toy Story (1995)", "Heat (1995)", "Fargo (1996)"], ["Casino (1995)", "Babe (1995)"])
    assert choice["role"] in {f"role{i}" for i in range(7)} and choice["format"] in {"title", "none", "year"}
    result = evaluate(run_dir, steps=1, n_users=4, ranker=ranker)
    assert result.n_users == 4 and result.llm_requests_per_user == 1.0
    assert sum(result.action_counts["role"].values()) == 4


@pytest.mark.slow
def test_evaluation_never_reads_the_target(tmp_path):
    """Permuting every user's target among its candidates leaves each chosen action and each ranking unchanged."""
    from rpp.agents import train
    from rpp.agents.checkpoints import latest_checkpoint, load_run_config
    from rpp.agents.serving import load_algorithm
    from rpp.envs import StateEncoder, make_core

    cfg = tiny_cfg(tmp_path, "shuffle", "train.total_steps=8")
    ranker = PromptHashRanker()
    run_dir = train(cfg, ranker=ranker, progress=False)
    run_cfg = load_run_config(run_dir)
    policy = load_algorithm(run_cfg, latest_checkpoint(run_dir)).policy
    core = make_core(run_cfg, "test", ranker=ranker, encoder=StateEncoder(run_cfg.encoder))
    a, b = shuffled_target_rollouts(policy, core, steps=3, seed=0)
    assert [r["actions"] for r in a] == [r["actions"] for r in b]
    assert [r["ranking_indices"] for r in a] == [r["ranking_indices"] for r in b]
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
    assert [r["target_rank"] for r in a] != [r["target_rank"] for r in b]  # the targets did move


@pytest.mark.slow
def test_fresh_train_refuses_to_overwrite_and_resume_refuses_a_different_config(tmp_path):
    from rpp.agents import train

    cfg = tiny_cfg(tmp_path, "guard", "train.total_steps=8")
    ranker = PromptHashRanker()
    run_dir = train(cfg, ranker=ranker, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, ranker=ranker, progress=False)
    changed = cfg.model_copy(deep=True)
    changed.train.learning_rate = 0.1
    with pytest.raises(ConfigError, match="train.learning_rate"):
        train(changed, resume=run_dir, ranker=ranker, progress=False)
    # a larger budget is a legitimate continuation
    longer = cfg.model_copy(deep=True)
    longer.train.total_steps = 16
    train(longer, resume=run_dir, ranker=ranker, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["timesteps"] for r in rows] == [8, 16]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["total_steps"] == 16


def test_ranker_check_warns_loudly_on_a_chance_level_ranker(tmp_path, capsys):
    from rpp.agents import check_ranker

    cfg = tiny_cfg(tmp_path, "check")
    report = check_ranker(cfg, PresentedOrderRanker(), run_dir=tmp_path, n_users=8)
    out, err = capsys.readouterr()
    assert report["clearly_above_random"] is False
    assert "NOT clearly better than a random order" in err and "!!!!" in err
    assert "random" in out and "popularity" in out
    saved = json.loads((tmp_path / "ranker_check.json").read_text())
    assert saved["n_users"] == 8
    assert saved["random_metrics"]["ndcg@10"] == pytest.approx(
        np.mean([1 / np.log2(r + 2) for r in range(10)]) / 2)  # 20 candidates, half of them inside the top 10


@pytest.mark.slow
def test_serving_sees_what_the_environment_shows(tmp_path):
    """PromptPolicy's one-shot observation for a user equals the env's first observation for that user, so the
    served choice is the one the policy makes at step 0 of an evaluation episode."""
    from rpp.agents import PromptPolicy, run_policy, train
    from rpp.envs import make_core

    cfg = tiny_cfg(tmp_path, "serve", "train.total_steps=8", "env.reward_baseline=none")
    ranker = PromptHashRanker()
    run_dir = train(cfg, ranker=ranker, progress=False)
    served = PromptPolicy.load(run_dir)
    core = make_core(served.cfg, "test", ranker=ranker, encoder=served.encoder)
    samples = core.samples[:3]
    _, env_obs = core.reset(samples)
    steps = run_policy(served.gated, core, samples, steps=1, batch_size=3)  # what the run serves
    for sample, obs, record in zip(samples, env_obs, steps):
        ctx = core.context(sample)
        ratings = list(ctx.history_ratings)
        mine = served.observation(ctx.history_titles, ctx.candidate_titles, ratings)
        np.testing.assert_allclose(mine, obs, atol=1e-5)
        assert served.choose(ctx.history_titles, ctx.candidate_titles, ratings) == record["actions"]
        prompt = served.personalize(ctx.history_titles, ctx.candidate_titles, ratings)
        assert prompt.action_ids == record["actions"] and prompt.text == record["prompt"]
    # no candidates: zero candidate rows, still a valid choice and prompt
    bare = served.observation(["Toy Story (1995)"])
    c = served.policy.context_rows
    assert not bare[c:].any() and bare[0].any() and bare[1].any()
    assert set(served.personalize(["Toy Story (1995)"]).action_ids) == {"role", "history", "reasoning", "format"}


@pytest.mark.slow
def test_rpp_plus_trains_and_evaluates_with_refined_sentences(tmp_path, monkeypatch):
    """refiner.enabled: training logs each rollout's rewrite counts, the run's usage.json has the refiner's
    totals, and evaluation writes the refined sentences to prompts.jsonl next to the original action ids."""
    import re

    import rpp.llm
    from rpp.agents import evaluate, train
    from rpp.llm.base import TextGenerator

    class Personalizer(TextGenerator):
        """Stand-in refiner model: appends a user-specific clause built from the summary in its prompt."""
        identity = "test-personalizer"

        def generate(self, prompts, max_new_tokens):
            out = []
            for messages in prompts:
                text = messages[-1]["content"]
                sentence = re.search(r"Sentence: (.*)\n", text).group(1)
                out.append(sentence.rstrip(".:") + ", with this viewer's favourite genres in mind.")
            self.usage.record_calls(calls=len(prompts))
            return out

    monkeypatch.setattr(rpp.llm, "make_generator", lambda refiner_cfg: Personalizer())
    cfg = tiny_cfg(tmp_path, "plus", "refiner.enabled=true", "train.total_steps=16",
                   f"llm.cache_path={tmp_path / 'cache' / 'responses.sqlite'}")
    ranker = PromptHashRanker()
    run_dir = train(cfg, ranker=ranker, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["refiner"]["sentences"] > 0 for r in rows)
    assert all(r["refiner"]["accepted"] == r["refiner"]["sentences"] for r in rows)
    usage = json.loads((run_dir / "usage.json").read_text())
    assert usage["refiner_this_session"]["accepted"] == sum(r["refiner"]["accepted"] for r in rows)
    assert (tmp_path / "cache" / "refinements.sqlite").is_file()

    result = evaluate(run_dir, steps=1, n_users=4, ranker=ranker)
    assert result.extra["refiner"]["sentences"] > 0
    records = [json.loads(line) for line in (run_dir / "prompts.jsonl").read_text().splitlines()]
    refined = [(p, r["actions"][p], text) for r in records for p, text in r["texts"].items() if text]
    assert refined and all(text.endswith("favourite genres in mind.") for _, _, text in refined)
    # texts keep their {placeholders} (like action texts); the rendered prompt carries every refined sentence
    assert all(r["prompt"].count("favourite genres in mind.") == sum(1 for t in r["texts"].values() if t)
               for r in records)

    # in the benchmark, a run trained with the refiner is RPP+ in every row, with its own refiner settings
    from rpp.benchmark import run_benchmark

    bench = load_config(None, [o for o in _TINY_OVERRIDES if o.startswith("data.") or o.startswith("env.")] + [
        "name=bench-plus", f"llm.cache_path={tmp_path / 'cache' / 'responses.sqlite'}", "eval.steps=2",
        f"benchmark.output_dir={tmp_path / 'out'}", "benchmark.methods=[]", f"benchmark.runs=[{run_dir}]",
        "eval.n_bootstrap=100"])
    out = run_benchmark(bench, ranker=ranker, progress=lambda m: None)
    table = pd.read_csv(out / "results.csv").set_index("method")
    assert list(table.index) == ["rpp+[plus] T=2", "rpp+[plus] T=1"]
    assert (table["refine_acceptance_rate"] == 1.0).all() and (table["refine_requests_per_user"] > 0).all()


@pytest.mark.slow
def test_entropy_coefficient_is_annealed_over_the_run(tmp_path):
    """train.ent_coef_final: SB3 reads model.ent_coef at each update; the schedule sets it from the progress made
    so far, linearly from ent_coef to ent_coef_final, and the TensorBoard log records each value."""
    from rpp.agents import train
    from rpp.agents.callbacks import EntropySchedule

    schedule = EntropySchedule(0.1, 0.0, 100)
    assert [schedule.value(t) for t in (0, 50, 100, 150)] == pytest.approx([0.1, 0.05, 0.0, 0.0])

    seen = []

    class Record(BaseCallback):
        def _on_step(self):
            return True

        def _on_rollout_end(self):  # runs after the schedule (callbacks run in order)
            seen.append((self.model.num_timesteps, self.model.ent_coef))

    cfg = tiny_cfg(tmp_path, "anneal", "train.ent_coef=0.2", "train.ent_coef_final=0.0")
    train(cfg, ranker=PromptHashRanker(), progress=False, callbacks=[Record()])
    assert [t for t, _ in seen] == [8, 16, 24]
    assert [c for _, c in seen] == pytest.approx([0.2 * (1 - t / 24) for t, _ in seen])
