"""The real vLLM OpenAI-compatible server for the vLLM tests and the serving benchmark.

It runs from its own virtualenv (`make vllm` builds `.venv-vllm`: vLLM pins a torch and a transformers of its own)
and serves the embedded SmolLM2 from its converted safetensors folder in the asset cache. Start-up is bounded: the
server is polled on /v1/models until it answers, and a server that exits or does not answer in time fails with the
tail of its log. The server and every process it spawns (vLLM runs its engine in a child process) live in their
own process group, and `stop()` ends the whole group and removes the server's scratch folder (its log and TMPDIR).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from llm_server import free_port

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SERVED_NAME = "smollm2-135m-instruct"
"""The name the server answers to: the embedded model's asset name, so rpp renders prompts with its tokenizer."""
MAX_MODEL_LEN = 2048


def smollm2_float32_folder() -> Path:
    """The float32 safetensors folder of the embedded SmolLM2 (converted once from the GGUF if not there yet)."""
    from rpp.llm.local import load_model

    return load_model(SERVED_NAME, "float32").folder


class ServedProcess:
    """A server process in its own process group, ready when `ready_url` answers 200; its output goes to a log."""

    name = "server"

    def __init__(self, cmd: list[str], env: dict, port: int) -> None:
        # a scratch folder of its own, removed by stop(): the log, and TMPDIR (vLLM leaves files in its TMPDIR)
        self.scratch = Path(tempfile.mkdtemp(prefix="rpp-served-"))
        self.cmd, self.port = cmd, port
        self.env = {**env, "TMPDIR": str(self.scratch)}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.scratch / "server.log"
        self._log_file = self.log_path.open("wb")
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, timeout_s: float = 300.0):
        started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"the {self.name} exited with {self.proc.returncode} while starting; "
                                   f"log tail:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - started
                        return self
            except OSError:
                time.sleep(1.0)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"the {self.name} did not answer on {self.base_url}/models within {timeout_s:.0f} s; "
                           f"log tail:\n{tail}")

    def stop(self, grace_s: float = 20.0) -> None:
        """End the whole process group (SIGTERM, then SIGKILL for whatever is left after `grace_s`) and remove
        the scratch folder."""
        if self.proc is None:
            self._log_file.close()
            shutil.rmtree(self.scratch, ignore_errors=True)
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(pgid):
            if self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.2)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
        self.proc.wait()
        end = time.monotonic() + 10
        while _group_alive(pgid) and time.monotonic() < end:
            time.sleep(0.1)
        self._log_file.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def alive_processes(self) -> bool:
        """Whether any process of the group is still there (for the no-leftovers check)."""
        return self.proc is not None and _group_alive(self.proc.pid)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class VllmServer(ServedProcess):
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 and a free port; started and stopped by the caller.

    Eager mode (no graph capture: ready in about a minute instead of several), float32 (bfloat16 was slower and
    less exact on CPU), a 2048-token context and 1 GiB of KV cache: enough for rpp's prompts, small enough to run
    next to the tests. `extra_env` adds variables, e.g. VLLM_CPU_OMP_THREADS_BIND to pin a replica to cores."""

    name = "vLLM server"

    def __init__(self, model_folder: Path, *, python: Path = VLLM_PYTHON, served_name: str = SERVED_NAME,
                 max_model_len: int = MAX_MODEL_LEN, kv_cache_gib: int = 1, extra_args: tuple[str, ...] = (),
                 extra_env: dict | None = None) -> None:
        if not Path(python).is_file():
            raise FileNotFoundError(f"no vLLM virtualenv at {Path(python).parent.parent}: run `make vllm`")
        port = free_port()
        self.served_name = served_name
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_folder),
               "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
               "--enforce-eager", "--dtype", "float32", "--max-model-len", str(max_model_len),
               "--uvicorn-log-level", "warning", *extra_args]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "PYTHONUNBUFFERED": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               **(extra_env or {})}
        super().__init__(cmd, env, port)


class VllmRouter(ServedProcess):
    """The vLLM project's router (`vllm-router`, from the same virtualenv) in front of running vLLM servers."""

    name = "vllm-router"

    def __init__(self, worker_urls: list[str], *, policy: str = "round_robin", python: Path = VLLM_PYTHON) -> None:
        router = Path(python).parent / "vllm-router"
        if not router.is_file():
            raise FileNotFoundError(f"no vllm-router in {router.parent}: run `make vllm`")
        port = free_port()
        cmd = [str(router), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
               "--worker-urls", *[u.removesuffix("/v1") for u in worker_urls]]
        super().__init__(cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}, port)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is alive (zombies of our own child do not count once reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(…, 0) also succeeds for zombies; look for a live member
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def taskwise_requests(n_users: int, mode: str = "score", split: str = "test"):
    """RankRequests of the first `n_users` users of the default config's split, with the task-wise prompt (the
    prompt rpp scores most): the same users and prompts for every backend compared."""
    from rpp.config import load_config
    from rpp.data import load_ml100k, split_users
    from rpp.llm import RankRequest
    from rpp.prompts import PromptBuilder, UserContext, load_action_set

    cfg = load_config(None, [])
    dataset = load_ml100k()
    samples = split_users(dataset, cfg.data, cfg.seed).users(split)[:n_users]
    builder = PromptBuilder(load_action_set(cfg.prompt.action_spaces), cfg.prompt, dataset.item_noun, mode=mode)
    requests = []
    for sample in samples:
        ctx = UserContext.from_sample(sample, dataset)
        requests.append(RankRequest(builder.build(ctx, builder.taskwise()).messages, ctx.candidate_titles))
    return requests
