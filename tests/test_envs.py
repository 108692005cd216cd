"""The step core and its three faces (Gymnasium, SB3 VecEnv, PettingZoo), the encoder and the user stream.

Most tests use HashRanker, a deterministic fake whose ranking depends on the whole prompt, so that every chosen
action changes the outcome; the tests marked `llm` run the conformance checks on the REAL SmolLM2 ranker.
"""
from __future__ import annotations

import hashlib
import warnings

import gymnasium
import numpy as np
import pandas as pd
import pytest

from rpp.config import EncoderConfig, load_config
from rpp.data import Dataset
from rpp.llm.base import Ranker, Ranking
from rpp.metrics import ndcg_at_k
from rpp.prompts import PATTERNS

from rpp.envs import (  # importing rpp.envs registers the Gymnasium id
    BatchedPromptVecEnv, PromptPersonalizationEnv, PromptPersonalizationParallelEnv, StateEncoder,
    UserStream, make_core,
)
from rpp.envs.core import state_text


def text_of(core, state) -> str:
    return state_text(state.context, state.chosen, state.sentences, state.step, state.last_order, core.encoder_cfg)


class HashRanker(Ranker):
    """Scores each candidate by a hash of (prompt, title): deterministic, prompt-sensitive, batch-independent."""

    identity = "hash-ranker"

    def __init__(self, fail_users: tuple = ()) -> None:
        super().__init__()
        self.fail_users = fail_users
        self.requests = []

    def rank(self, requests):
        self.requests.append(list(requests))
        out = []
        for req in requests:
            text = "".join(m["content"] for m in req.messages)
            if any(f"FAIL-{u}" in text for u in self.fail_users):
                out.append(Ranking.presented_order(len(req.candidates), "simulated failure"))
                continue
            scores = [int.from_bytes(hashlib.sha256((text + "\x00" + c).encode()).digest()[:8], "little") / 2**64
                      for c in req.candidates]
            order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
            out.append(Ranking(order=order, scores=scores, prompt_tokens=len(text) // 4, wall_s=0.001))
        self.usage.record(out)
        return out


def cfg_with(*overrides):
    return load_config(None, ["data.n_train_users=20", "data.n_val_users=4", "data.n_test_users=4",
                              "env.n_envs=4", "env.steps_per_episode=2", *overrides])


@pytest.fixture(scope="module")
def encoder():
    return StateEncoder(EncoderConfig())


@pytest.fixture(scope="module")
def cfg():
    return cfg_with()


@pytest.fixture()
def core(cfg, encoder):
    return make_core(cfg, "train", ranker=HashRanker(), encoder=encoder)


# ---------------------------------------------------------------------------------------------- core

def test_reset_observation_layout(core):
    sample = core.samples[0]
    states, obs = core.reset([sample])
    assert core.context_rows == 2  # state row, user row (the history-embedding row is opt-in)
    assert obs.shape == (1, core.context_rows + core.obs_candidates, core.encoder.dim) == (1, 22, 384)
    assert obs.dtype == np.float32 and core.observation_space.contains(obs[0])
    # before the first step the candidate rows are in presented order
    expected = core.item_embeddings.lookup(sample.candidates)
    np.testing.assert_array_equal(obs[0, core.context_rows:], expected)
    assert np.isclose(np.linalg.norm(obs[0, 0]), 1.0, atol=1e-4)
    # row 1: the user's standardized features (history only); the step slot is 0 at reset
    assert obs[0, 1, -1] == 0.0 and np.abs(obs[0, 1]).max() > 0.1
    other = core.samples[1]
    assert not np.allclose(core.reset([other])[1][0, 1], obs[0, 1])
    assert states[0].step == 0 and states[0].chosen == core.builder.taskwise()


def test_user_features_read_the_history_and_are_fixed_per_dataset(cfg, encoder):
    """Genre shares (whole and recent history), dominant-genre one-hots and history statistics come from the
    history; the standardization is fitted on the whole dataset once, so a user's row is identical in the train
    core and in a core of another split."""
    from types import SimpleNamespace

    from rpp.envs.features import RECENT, UserFeatures

    feats = UserFeatures(["Drama", "Comedy", "Horror"], dim=20)
    history = [("Drama",), ("Drama", "Comedy"), ("Drama",), ("Horror",)] + [("Comedy",)] * RECENT
    ctx = SimpleNamespace(history_titles=["t"] * len(history), history_ratings=[5.0, 4.0, np.nan, 2.0] + [3.0] * RECENT,
                          history_genres=history)
    row = feats.numeric(ctx)
    np.testing.assert_allclose(row[:3], np.array([3, 11, 1]) / 15)  # genre shares of the whole history
    np.testing.assert_allclose(row[3:6], [0, 1, 0])  # ... and of the last RECENT items
    assert row[6:9].tolist() == [0.0, 1.0, 0.0] and row[9:12].tolist() == [0.0, 1.0, 0.0]  # dominant, recent dominant
    assert feats.value(ctx, "genre") == "Comedy" and feats.value(ctx, "history_length") == len(history)
    ratings = np.array([5.0, 4.0, 2.0] + [3.0] * RECENT)
    assert row[13] == pytest.approx((ratings.mean() - 1) / 4) and row[15] == pytest.approx(2 / len(ratings))
    assert feats.value(ctx, "mean_rating") == pytest.approx(ratings.mean())
    assert feats.layout == {"categorical": [[6, 9], [9, 12]], "numeric": [12, 13, 14, 15], "shares": list(range(6))}
    with pytest.raises(ValueError, match="unknown user feature"):
        feats.value(ctx, "zodiac")

    train = make_core(cfg, "train", ranker=HashRanker(), encoder=encoder)
    rows_train = train.user_rows(train.samples[0])
    again = make_core(cfg, "test", ranker=HashRanker(), encoder=encoder)
    np.testing.assert_array_equal(again.user_rows(train.samples[0]), rows_train)
    assert rows_train.shape == (1, encoder.dim) and np.abs(rows_train).max() <= 1.0
    assert train.context_rows == 2


def test_step_reward_is_ndcg_minus_taskwise_baseline(core):
    sample = core.samples[1]
    states, _ = core.reset([sample])
    # the baseline is the NDCG of the task-wise prompt's ranking, computed at reset
    baseline_request = core.ranker.requests[-1][-1]
    taskwise_text = "".join(m["content"] for m in core.builder.build(states[0].context, core.builder.taskwise()).messages)
    assert "".join(m["content"] for m in baseline_request.messages) == taskwise_text
    obs, rewards, infos = core.step(states, [[1, 2, 3, 2]])
    info = infos[0]
    order = info["ranking"]
    rank = order.index(sample.target_index)
    assert info["target_rank"] == rank
    assert info["ndcg"] == pytest.approx(ndcg_at_k([rank], 10)[0])
    assert rewards[0] == pytest.approx(info["ndcg"] - info["baseline"]) and info["reward"] == rewards[0]
    assert info["metrics"]["ndcg@10"] == pytest.approx(info["ndcg"]) and "hr@5" in info["metrics"]
    assert info["action_indices"] == [1, 2, 3, 2]
    assert info["actions"]["reasoning"] == core.action_set.action("reasoning", 3).id
    assert "[system]" in info["prompt"] and info["ranker_failed"] is False
    assert info["usage"].prompt_tokens > 0
    # the candidate rows now follow this step's ranking, the state text mentions its top titles, and the
    # numeric row carries the episode step t / T
    np.testing.assert_array_equal(obs[0, core.context_rows:], states[0].candidate_embeddings[order])
    assert "ranked first: " + states[0].context.candidate_titles[order[0]] in text_of(core, states[0])
    assert obs[0, 1, -1] == pytest.approx(1 / core.steps_per_episode)


def test_baseline_is_cached_per_user_and_batched(core):
    ranker = core.ranker
    before = ranker.usage.batches
    core.reset(core.samples[:5])
    assert ranker.usage.batches == before + 1 and len(ranker.requests[-1]) == 5
    core.reset(core.samples[:5])
    assert ranker.usage.batches == before + 1, "a user's task-wise baseline is computed once"


def test_no_baseline_when_disabled(encoder):
    core = make_core(cfg_with("env.reward_baseline=none"), "train", ranker=HashRanker(), encoder=encoder)
    states, _ = core.reset(core.samples[:3])
    assert core.ranker.usage.batches == 0
    _, rewards, infos = core.step(states, np.zeros((3, 4), dtype=int))
    assert [i["baseline"] for i in infos] == [0.0] * 3
    np.testing.assert_allclose(rewards, [i["ndcg"] for i in infos])


def test_failed_ranking_earns_no_reward(cfg, encoder):
    core = make_core(cfg, "train", ranker=HashRanker(), encoder=encoder)
    states, _ = core.reset(core.samples[:2])

    class Marker:  # a refiner that writes a marker into user 0's prompt, so HashRanker fails that request
        def refine(self, contexts, chosen, step):
            return [{"format": f"FAIL-{contexts[0].user}"}, None]

    core.refiner = Marker()
    core.ranker.fail_users = (states[0].sample.user,)
    _, rewards, infos = core.step(states, np.ones((2, 4), dtype=int))
    assert infos[0]["ranker_failed"] and infos[0]["ranker_error"] == "simulated failure" and rewards[0] == 0.0
    assert not infos[1]["ranker_failed"]


def test_failed_baseline_earns_no_reward_and_is_counted(cfg, encoder):
    """A user whose task-wise baseline call failed must not be rewarded with raw NDCG (that would reward the
    user effect): the episode earns 0, is flagged, counted, and the baseline is asked for again next time."""
    core = make_core(cfg, "train", ranker=HashRanker(), encoder=encoder)
    samples = core.samples[:2]
    failing = samples[0].user
    core.ranker.fail_users = (failing,)
    original = core.builder.cfg.system
    core.builder.cfg = core.builder.cfg.model_copy(update={"system": f"{original} FAIL-{failing}"})
    states, _ = core.reset(samples)  # both baselines fail (the marker is in every prompt)
    core.ranker.fail_users = ()
    assert core.failed_baselines == 2 and states[0].baseline is None
    _, rewards, infos = core.step(states, np.ones((2, 4), dtype=int))
    assert not infos[0]["ranker_failed"] and infos[0]["ndcg"] >= 0
    assert rewards.tolist() == [0.0, 0.0] and all(i["baseline_failed"] for i in infos)
    states, _ = core.reset(samples)  # asked again, and now it works
    assert states[0].baseline is not None and core.failed_baselines == 2


def test_out_of_range_actions_are_rejected(core):
    states, _ = core.reset(core.samples[:1])
    with pytest.raises(ValueError, match="pattern 'history' is out of range"):
        core.step(states, [[0, 99, 0, 0]])
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        core.step(states, [[0, 0, 0]])


def test_refiner_texts_reach_prompt_state_and_info(core):
    class Refiner:
        def __init__(self):
            self.calls = []

        def refine(self, contexts, chosen, step):
            self.calls.append((len(contexts), step))
            if step > 0:
                return [None] * len(contexts)  # refine at step 0 only; the core keeps the text afterwards
            return [{"role": f"You are {ctx.user}'s personal curator."} for ctx in contexts]

    core.refiner = refiner = Refiner()
    states, _ = core.reset(core.samples[:2])
    _, _, infos = core.step(states, [[1, 0, 0, 0], [1, 0, 0, 0]])
    user = states[0].sample.user
    assert infos[0]["refined"] == {"role": f"You are {user}'s personal curator."}
    assert f"You are {user}'s personal curator." in infos[0]["prompt"]
    assert "personal curator" in text_of(core, states[0])
    _, _, infos = core.step(states, [[1, 0, 0, 0], [2, 0, 0, 0]])
    assert infos[0]["refined"] and "personal curator" in infos[0]["prompt"]  # kept while the action stays
    assert infos[1]["refined"] == {} and "personal curator" not in infos[1]["prompt"]  # dropped on a switch
    assert refiner.calls == [(2, 0), (2, 1)]


# ---------------------------------------------------------------------------------------------- gymnasium

def test_gym_env_passes_check_env_with_fake_ranker(core):
    from gymnasium.utils.env_checker import check_env

    env = PromptPersonalizationEnv(core)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any checker warning is a failure
        check_env(env, skip_render_check=True)


def test_gym_env_episode_and_registration(cfg, core):
    env = gymnasium.make("rpp/PromptPersonalization-v0", core=core)
    assert isinstance(env.action_space, gymnasium.spaces.MultiDiscrete)
    assert list(env.action_space.nvec) == core.nvec
    obs, info = env.reset(seed=3)
    first_user = info["user"]
    assert env.reset(seed=3)[1]["user"] == first_user
    assert env.reset()[1]["user"] != first_user
    obs, info = env.reset(options={"user": core.samples[5].user})
    assert info["user"] == core.samples[5].user
    for t in range(cfg.env.steps_per_episode):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        # the episode ENDS after T prompts (terminated), it is not cut short (truncated)
        assert truncated is False and terminated == (t == cfg.env.steps_per_episode - 1)
    with pytest.raises(RuntimeError, match="episode is over"):
        env.unwrapped.step(env.action_space.sample())


def test_custom_action_set_changes_nvec_without_code_changes(tmp_path, encoder):
    roles = "\n".join(f"  - {{id: r{i}, text: 'You are persona number {i}, an expert on {{item_noun_plural}}.'}}"
                      for i in range(7))
    formats = "\n".join(f"  - {{id: f{i}, text: 'Answer style {i}.'}}" for i in range(3))
    path = tmp_path / "seven_roles.yaml"
    path.write_text(f"role:\n{roles}\nhistory:\n  - {{id: h5, text: 'Recent:', params: {{window: 5}}}}\n"
                    f"  - {{id: h20, text: 'Longer:', params: {{window: 20, ratings: true}}}}\n"
                    f"reasoning:\n  - {{id: none, text: ''}}\nformat:\n{formats}\n")
    cfg = cfg_with(f"prompt.action_spaces={path}")
    core = make_core(cfg, "train", ranker=HashRanker(), encoder=encoder)
    assert core.nvec == [7, 2, 1, 3]
    env = PromptPersonalizationEnv(core)
    assert list(env.action_space.nvec) == [7, 2, 1, 3]
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([6, 1, 0, 2]))
    assert "persona number 6" in info["prompt"] and "Answer style 2." in info["prompt"]
    venv = BatchedPromptVecEnv(core, n_envs=3)
    assert list(venv.action_space.nvec) == [7, 2, 1, 3]
    venv.reset()
    _, rewards, _, _ = venv.step(np.array([[6, 1, 0, 2]] * 3))
    assert rewards.shape == (3,)


# ---------------------------------------------------------------------------------------------- vec env

def test_vec_env_step_of_16_users_is_one_ranker_call(encoder):
    cfg = cfg_with("env.n_envs=16")
    ranker = HashRanker()
    venv = BatchedPromptVecEnv(make_core(cfg, "train", ranker=ranker, encoder=encoder))
    assert venv.num_envs == 16
    venv.reset()
    assert ranker.usage.batches == 1  # the 16 task-wise baselines, in one call
    actions = np.stack([venv.action_space.sample() for _ in range(16)])
    venv.step(actions)
    assert ranker.usage.batches == 2 and len(ranker.requests[-1]) == 16
    # the last step of the episode: one call for the step, at most one more for the next users' baselines
    _, _, dones, infos = venv.step(actions)
    assert dones.all() and ranker.usage.batches <= 4
    assert all("TimeLimit.truncated" not in i and i["terminal_observation"].shape == venv.observation_space.shape
               for i in infos)


def test_vec_env_equals_single_envs(cfg, encoder):
    n, episodes = 4, 3
    t_steps = cfg.env.steps_per_episode
    venv = BatchedPromptVecEnv(make_core(cfg, "train", ranker=HashRanker(), encoder=encoder), n_envs=n)
    rng = np.random.default_rng(0)
    actions = rng.integers(0, venv.action_space.nvec, size=(episodes * t_steps, n, 4))
    obs = venv.reset()
    users = [[i["user"] for i in venv.reset_infos]]
    vec_obs, vec_rewards, vec_infos = [obs.copy()], [], []
    for t in range(episodes * t_steps):
        obs, rewards, dones, infos = venv.step(actions[t])
        vec_rewards.append(rewards)
        vec_infos.append(infos)
        vec_obs.append(np.stack([i["terminal_observation"] if d else o for o, d, i in zip(obs, dones, infos)]))
        if dones.all():
            users.append([i["user"] for i in venv.reset_infos])
            vec_obs.append(obs.copy())
    # the same users, each played in its own single env (own core, own ranker) with the same actions
    for i in range(n):
        env = PromptPersonalizationEnv(make_core(cfg, "train", ranker=HashRanker(), encoder=encoder))
        k = 0
        for e in range(episodes):
            o, info = env.reset(options={"user": users[e][i]})
            np.testing.assert_allclose(o, vec_obs[k][i], atol=1e-5)
            k += 1
            for t in range(t_steps):
                step = e * t_steps + t
                o, r, term, trunc, info = env.step(actions[step][i])
                np.testing.assert_allclose(o, vec_obs[k][i], atol=1e-5)
                assert np.float32(r) == vec_rewards[step][i]
                assert info["ranking"] == vec_infos[step][i]["ranking"]
                assert info["prompt"] == vec_infos[step][i]["prompt"]
                k += 1
    # the stream served distinct users within an epoch
    flat = [u for block in users for u in block]
    assert len(set(flat)) == len(flat)


def test_vec_env_resumes_the_user_stream_exactly(cfg, encoder):
    def run(venv, rollouts):
        served = []
        for _ in range(rollouts):
            for _ in range(cfg.env.steps_per_episode):
                venv.step(np.zeros((venv.num_envs, 4), dtype=int))
            served.append([i["user"] for i in venv.reset_infos])
        return served

    make = lambda: BatchedPromptVecEnv(make_core(cfg, "train", ranker=HashRanker(), encoder=encoder), n_envs=3)
    uninterrupted = make()
    uninterrupted.reset()
    run(uninterrupted, 2)
    saved = uninterrupted.get_state()  # at a rollout boundary
    expected = [[i["user"] for i in uninterrupted.reset_infos]] + run(uninterrupted, 8)  # spans an epoch change

    resumed = make()
    resumed.set_state(saved)
    resumed.reset()
    got = [[i["user"] for i in resumed.reset_infos]] + run(resumed, 8)
    assert got == expected
    with pytest.raises(ValueError, match="saved with 3 envs"):
        BatchedPromptVecEnv(resumed.core, n_envs=2).set_state(saved)


def test_vec_env_seed_restarts_the_stream(cfg, encoder):
    venv = BatchedPromptVecEnv(make_core(cfg, "train", ranker=HashRanker(), encoder=encoder), n_envs=2)
    venv.seed(11)
    venv.reset()
    first = [i["user"] for i in venv.reset_infos]
    venv.reset()
    venv.seed(11)
    venv.reset()
    assert [i["user"] for i in venv.reset_infos] == first


def test_vec_env_trains_with_sb3_without_bootstrapping_past_the_episode(cfg, encoder):
    """SB3 accepts the VecEnv as is (a short PPO run through the real rollout code), and the last step of an
    episode is a real end: its return is its own reward, no gamma * V(terminal obs) is added (which SB3 does for
    steps flagged TimeLimit.truncated)."""
    from stable_baselines3 import PPO

    venv = BatchedPromptVecEnv(make_core(cfg, "train", ranker=HashRanker(), encoder=encoder), n_envs=2)
    model = PPO("MlpPolicy", venv, n_steps=4, batch_size=4, n_epochs=1, gamma=0.9, gae_lambda=1.0, seed=0,
                device="cpu")
    captured = {}

    from stable_baselines3.common.callbacks import BaseCallback

    class Grab(BaseCallback):
        def _on_step(self):
            return True

        def _on_rollout_end(self):
            buf = self.model.rollout_buffer
            captured["returns"] = buf.returns.copy()
            captured["rewards"] = buf.rewards.copy()

    model.learn(total_timesteps=8, callback=Grab())
    assert model.num_timesteps == 8
    t_steps = cfg.env.steps_per_episode
    last = np.arange(t_steps - 1, 4, t_steps)  # rollout rows holding an episode's last step
    np.testing.assert_allclose(captured["returns"][last], captured["rewards"][last], atol=1e-6)


# ---------------------------------------------------------------------------------------------- pettingzoo

def test_parallel_env_passes_api_test_with_fake_ranker(core):
    from pettingzoo.test import parallel_api_test

    env = PromptPersonalizationParallelEnv(core)
    parallel_api_test(env, num_cycles=10)
    assert env.possible_agents == list(PATTERNS)
    assert [env.action_space(a).n for a in PATTERNS] == core.nvec


def test_parallel_env_matches_gym_env(core):
    par = PromptPersonalizationParallelEnv(core)
    gym_env = PromptPersonalizationEnv(core)
    user = core.samples[2].user
    obs_p, _ = par.reset(options={"user": user})
    obs_g, _ = gym_env.reset(options={"user": user})
    np.testing.assert_array_equal(obs_p["history"], obs_g)
    action = {"role": 2, "history": 1, "reasoning": 4, "format": 0}
    obs_p, rew_p, _, trunc_p, info_p = par.step(action)
    obs_g, rew_g, _, _, info_g = gym_env.step(np.array([2, 1, 4, 0]))
    assert rew_p == {a: rew_g for a in PATTERNS} and info_p["format"]["prompt"] == info_g["prompt"]


# ---------------------------------------------------------------------------------------------- stream, encoder

def test_user_stream_is_seeded_and_reshuffles_each_epoch(ml100k_split):
    samples = ml100k_split.train
    a, b = UserStream(samples, seed=1), UserStream(samples, seed=1)
    epoch0 = [s.user for s in a.take(len(samples))]
    epoch1 = [s.user for s in a.take(len(samples))]
    assert epoch0 == [s.user for s in b.take(len(samples))]
    assert sorted(epoch0) == sorted(epoch1) == sorted(s.user for s in samples)
    assert epoch0 != epoch1
    assert [s.user for s in UserStream(samples, seed=2).take(len(samples))] != epoch0


def test_item_embeddings_are_cached_on_disk_atomically(tmp_path, monkeypatch, encoder):
    monkeypatch.setenv("RPP_CACHE", str(tmp_path))
    items = pd.DataFrame({"item": [10, 20, 30], "title": ["Alpha (1990)", "Beta (1991)", "Gamma (1992)"],
                          "genres": ["", "", ""]})
    inter = pd.DataFrame({"user": [1], "item": [10], "timestamp": [0], "rating": [1.0]})
    dataset = Dataset("tiny", inter, items, "movie")
    fresh = StateEncoder(EncoderConfig())  # the model itself is shared with `encoder` (loaded once per process)
    assert fresh.model is encoder.model
    emb = fresh.item_embeddings(dataset)
    files = list((tmp_path / "embeddings").iterdir())
    assert [f.name for f in files] == [files[0].name] and files[0].name.startswith("tiny-all-minilm-l6-v2-")
    np.testing.assert_allclose(np.linalg.norm(emb.lookup([30, 10]), axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb.lookup([20])[0], encoder.encode(["Beta (1991)"])[0], atol=1e-5)  # padding
    # a new process reads the file instead of encoding: prove it by planting recognisable values
    planted = np.full((3, encoder.dim), 0.5, dtype=np.float32)
    np.save(files[0], planted)
    assert (StateEncoder(EncoderConfig()).item_embeddings(dataset).lookup([10]) == 0.5).all()
    # a changed title is a different dataset version: a new file
    items.loc[0, "title"] = "Alpha Redux (1990)"
    StateEncoder(EncoderConfig()).item_embeddings(Dataset("tiny", inter, items, "movie"))
    assert len(list((tmp_path / "embeddings").glob("*.npy"))) == 2
    assert not list((tmp_path / "embeddings").glob("*.tmp"))


def test_state_texts_are_encoded_in_one_batch_and_cached(encoder, monkeypatch):
    calls = []
    original = encoder._embed
    monkeypatch.setattr(encoder, "_embed", lambda texts: calls.append(list(texts)) or original(texts))
    texts = [f"state text number {i}" for i in range(5)]
    first = encoder.encode(texts + texts[:2])
    assert calls == [texts]
    again = encoder.encode(texts[::-1])
    assert calls == [texts]
    np.testing.assert_array_equal(again, first[:5][::-1])


# ---------------------------------------------------------------------------------------------- real SmolLM2

@pytest.fixture(scope="module")
def llm_core(smollm_ranker, encoder):
    """The real ranker on 6 candidates per user (not 20) to keep the conformance checks within a few minutes
    on 2 CPU cores; everything else is the default configuration."""
    return make_core(cfg_with("data.n_candidates=6"), "train", ranker=smollm_ranker, encoder=encoder)


@pytest.mark.llm
def test_check_env_with_real_smollm_ranker(llm_core):
    from gymnasium.utils.env_checker import check_env

    env = PromptPersonalizationEnv(llm_core)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env, skip_render_check=True)
    _, info = env.reset(seed=0)
    _, reward, _, _, info = env.step(np.array([1, 1, 2, 0]))
    assert not info["ranker_failed"] and info["usage"].prompt_tokens > 0
    assert -1.0 <= reward <= 1.0


@pytest.mark.llm
def test_parallel_api_test_with_real_smollm_ranker(llm_core):
    from pettingzoo.test import parallel_api_test

    parallel_api_test(PromptPersonalizationParallelEnv(llm_core), num_cycles=10)


@pytest.mark.llm
def test_vec_env_batches_the_real_ranker(llm_core):
    ranker = llm_core.ranker
    venv = BatchedPromptVecEnv(llm_core, n_envs=4)
    venv.reset()
    before = ranker.usage.batches
    _, rewards, _, infos = venv.step(np.array([[1, 1, 0, 0]] * 4))
    assert ranker.usage.batches == before + 1
    assert not any(i["ranker_failed"] for i in infos) and np.isfinite(rewards).all()
