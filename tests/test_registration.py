"""`import rpp` registers the Gymnasium id without loading torch; `gymnasium.make` of the id builds the env.
Each check runs in a fresh interpreter, so nothing imported by other tests can register the id for it."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_import_rpp_registers_the_env_id_without_loading_torch():
    out = fresh_python("""
        import sys
        import gymnasium
        assert "rpp/PromptPersonalization-v0" not in gymnasium.registry
        import rpp
        spec = gymnasium.spec("rpp/PromptPersonalization-v0")
        assert spec.id == rpp.ENV_ID and spec.entry_point == "rpp.envs.gym_env:PromptPersonalizationEnv"
        assert "torch" not in sys.modules, "import rpp must not load torch"
        assert "rpp.envs" not in sys.modules
        import rpp.envs  # importing the envs package afterwards must not register the id twice
        assert rpp.envs.ENV_ID == rpp.ENV_ID
        print("ok")
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert "Overriding environment" not in out.stderr


@pytest.mark.slow
def test_gymnasium_make_of_the_documented_id_after_import_rpp():
    out = fresh_python("""
        import sys
        import gymnasium
        import rpp
        sys.path.insert(0, TESTS_DIR)  # the test doubles of test_agents_train
        from test_agents_train import PresentedOrderRanker

        cfg = rpp.load_config(None, ["data.n_train_users=2", "data.n_val_users=2", "data.n_test_users=2",
                                     "env.steps_per_episode=1", "train.check_users=0"])
        env = gymnasium.make("rpp/PromptPersonalization-v0", cfg=cfg, split="train", ranker=PresentedOrderRanker())
        obs, info = env.reset(seed=0)
        assert env.observation_space.contains(obs)
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert terminated or truncated
        print(type(env.unwrapped).__name__)
    """.replace("TESTS_DIR", repr(str(Path(__file__).parent))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "PromptPersonalizationEnv"
