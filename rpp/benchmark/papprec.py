"""PAP-REC (Li et al., arXiv 2402.00284) on a decoder-only ranker that scores titles by log-likelihood.

The prompt is the task-wise prompt followed by a SUFFIX of ``papprec.n_shared`` trigger tokens and ONE user token,
right before the assistant turn whose answer (a candidate title) is scored. Triggers are token ids of the ranker's
vocabulary inserted between the end of the user's message and the chat template's end-of-turn tokens, so they
never merge with the text around them; they are drawn from whole-word alphabetic tokens (a leading space and
letters only, never a special or added token).

Search (AutoPrompt / HotFlip first-order step):
- candidates for a slot: the gradient of the loss w.r.t. the input embedding at that slot, dot products with the
  embedding matrix, the top ``papprec.top_k`` tokens by ``-e_t . grad``. The loss is the method's own: the negative
  log-likelihood of the target title (minus the ranker's ``sum`` score);
- selection is NOT by the loss: a candidate replaces the current token only if the surrogate metric HR@5 + NDCG@5
  of the log-likelihood ranking improves on validation data;
- schedule: shared rounds (a seeded random trigger position; its k candidates evaluated on the training users'
  validation samples; the best is kept if it improves the mean surrogate; the search stops when every position
  failed in a row, or after ``papprec.max_rounds``) alternate with user rounds (each user's own gradient, own
  top-k, a candidate kept only if that user's own validation surrogate strictly improves).

Data, without touching any test target: for a user, the validation sample is the last HISTORY item (the history
before it, and its own seeded negatives among the items the user has not interacted with in the history); the
training samples are the ``papprec.train_positions`` history items before it. Gradients come from training
samples, choices from validation samples. The shared tokens are learned on ``papprec.train_users`` training users.

Rows: ``papprec_shared`` (shared tokens + the initial user token for every test user) and ``papprec_personal``
(shared tokens + a user token searched on each test user's own history, per user and transductive as in the paper,
where every test user is also a training user).

Cost. The prefix before the triggers is the same for every candidate token, so it runs once per sample and round
(its KV cache is kept for up to ``papprec.kv_cache_samples`` samples); the k candidate suffixes and their 20 titles
then run on copies of it, and the gradient is taken through the suffix and the title only. The method counts its
own forward and backward passes and the ranking requests it scores (a request = one prompt, every candidate
scored). Scored requests go through the benchmark's response cache like every other request (keyed on the
ranker's identity and the exact token ids of the prompt and the titles: ``token_request_key``), so a rerun replays
them; requests are counted whether answered from the cache or not (what the method costs on a cold cache).

Local backend only: the search needs gradients through the ranker's own model.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from rpp.benchmark.methods import BenchContext, BenchmarkError, Method
from rpp.data import UserSample
from rpp.llm.base import Ranking
from rpp.llm.parsing import order_from_scores
from rpp.metrics import hit_at_k, ndcg_at_k, target_rank

SURROGATE_K = 5
"""The surrogate metric is HR@5 + NDCG@5 (as in the paper)."""

_MARKER = "\u0000rpp-trigger-slot\u0000"
"""Appended to the user's message to find where the trigger ids go in the chat template's text."""


# ---------------------------------------------------------------------------------------------- the ranker's model


def local_model(ranker) -> object:
    """The LoadedModel behind the benchmark's ranker (through its metering and cache wrappers), or a clear error:
    the search needs gradients through the very model that scores the prompt, so only the local backend works."""
    from rpp.llm.base import BootstrapRanker
    from rpp.llm.local import LocalRanker

    seen = ranker
    while seen is not None:
        if isinstance(seen, LocalRanker):
            if seen.mode != "score":
                raise BenchmarkError("papprec scores candidates by log-likelihood: set llm.mode: score")
            if seen.reduction != "sum":
                raise BenchmarkError("papprec's loss and scores are summed title log-probs: set "
                                     "llm.score_reduction: sum")
            return seen.loaded
        if isinstance(seen, BootstrapRanker):
            raise BenchmarkError("papprec does not support llm.bootstrap > 1 (set llm.bootstrap: 1)")
        seen = getattr(seen, "inner", None)
    raise BenchmarkError("papprec needs gradients through the ranker's model: it works with llm.backend: local "
                         f"only (this ranker is {getattr(ranker, 'identity', type(ranker).__name__)})")


def response_cache(ranker):
    """(identity, ResponseCache) of the cache in front of the benchmark's ranker, or (None, None) without one
    (--no-cache)."""
    from rpp.llm.cache import ResponseCache

    seen = ranker
    while seen is not None:
        cache = getattr(seen, "cache", None)
        if isinstance(cache, ResponseCache):
            return seen.identity, cache
        seen = getattr(seen, "inner", None)
    return None, None


def token_request_key(identity: str, prompt_ids: Sequence[int], titles: Sequence[Sequence[int]]) -> str:
    """The response-cache key of a token-id scoring request: ranker identity, prompt token ids, title token ids
    (a namespace of its own, so it never collides with a message request's key)."""
    import hashlib
    import json

    from rpp.llm.cache import SCHEMA_VERSION

    payload = json.dumps({"v": SCHEMA_VERSION, "ranker": identity, "kind": "papprec-token-ids",
                          "prompt_ids": [int(t) for t in prompt_ids],
                          "titles": [[int(t) for t in title] for title in titles]})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def trigger_vocabulary(tokenizer) -> np.ndarray:
    """Token ids a trigger may take: whole-word alphabetic tokens (a leading space, then 2+ ASCII letters), never a
    special token or a token added to the vocabulary after training. Boolean mask over the embedding rows."""
    import re

    word = re.compile(r"^ [A-Za-z]{2,}$")
    excluded = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    mask = np.zeros(len(tokenizer), dtype=bool)
    for tid in range(len(tokenizer)):
        if tid in excluded:
            continue
        if word.match(tokenizer.decode([tid], skip_special_tokens=False, clean_up_tokenization_spaces=False)):
            mask[tid] = True
    return mask


def word_token(tokenizer, word: str) -> int:
    """The single whole-word token of " word" (the initial value of every trigger slot)."""
    ids = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise BenchmarkError(f"papprec.init_word {word!r}: ' {word.strip()}' is {len(ids)} tokens for this "
                             "ranker's tokenizer; choose a word that is one token")
    return int(ids[0])


@dataclass
class Counters:
    """What the search spent: model invocations and ranking requests (one prompt with all candidates scored)."""

    forward: int = 0
    backward: int = 0
    requests: int = 0
    tokens: int = 0
    """Prompt + title tokens of the scored requests (what the ranker would report for the same requests)."""

    def snapshot(self) -> "Counters":
        return Counters(self.forward, self.backward, self.requests, self.tokens)

    def __sub__(self, other: "Counters") -> "Counters":
        return Counters(self.forward - other.forward, self.backward - other.backward, self.requests - other.requests,
                        self.tokens - other.tokens)


@dataclass
class Sample:
    """One prompt cut at the trigger slot: ``before`` + triggers + ``after`` + a candidate title."""

    before: list
    after: list
    titles: list
    """Token ids of each candidate title (presented order)."""
    target_index: Optional[int] = None
    """None for a test user's final ranking (the method never reads a test target)."""
    key: tuple = ()


class SuffixScorer:
    """Scores candidate titles after ``before + suffix`` for several suffixes at once, and takes the gradient of a
    title's NLL w.r.t. the suffix's trigger embeddings, on the ranker's model. ``before`` runs once per sample (its
    KV cache is kept for the last `kv_cache_samples` samples)."""

    def __init__(self, loaded, kv_cache_samples: int = 32, counters: Optional[Counters] = None,
                 cache=None, identity: Optional[str] = None) -> None:
        self.loaded = loaded
        self.cache, self.identity = (cache, identity) if cache is not None and identity else (None, None)
        """The response cache scored requests go through (None: every request is computed)."""
        self.model = loaded.model
        self.counters = counters or Counters()
        self._kv: OrderedDict = OrderedDict()
        self.kv_cache_samples = int(kv_cache_samples)
        pad = loaded.tokenizer.pad_token_id
        self.pad = int(pad if pad is not None else 0)

    def _prefix_kv(self, sample: Sample):
        import torch

        key = sample.key or tuple(sample.before)
        hit = self._kv.get(key)
        if hit is not None:
            self._kv.move_to_end(key)
            return hit
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([sample.before]), use_cache=True, logits_to_keep=1)
        self.counters.forward += 1
        kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        if self.kv_cache_samples > 0:
            self._kv[key] = kv
            while len(self._kv) > self.kv_cache_samples:
                self._kv.popitem(last=False)
        return kv

    def clear(self) -> None:
        self._kv.clear()

    def scores(self, sample: Sample, suffixes: Sequence[Sequence[int]]) -> np.ndarray:
        """[len(suffixes), n_titles]: each title's summed log-prob as the answer to before + suffix + after.
        Every suffix is the same length (the trigger slots); one ranking request is counted per suffix."""


        if len({len(s) for s in suffixes}) != 1:
            raise ValueError("all suffixes must have the same length")
        n_all = len(suffixes)
        width_all = len(sample.before) + len(suffixes[0]) + len(sample.after)
        self.counters.requests += n_all
        self.counters.tokens += n_all * (width_all + sum(len(t) for t in sample.titles))
        if self.cache is None:
            return self._compute(sample, suffixes)
        from rpp.llm.base import Ranking

        keys = [token_request_key(self.identity, list(sample.before) + list(s) + list(sample.after), sample.titles)
                for s in suffixes]
        out = np.full((n_all, len(sample.titles)), -np.inf)
        missing = []
        for v, key in enumerate(keys):
            hit = self.cache.get(key)
            if hit is not None and hit.scores is not None and len(hit.scores) == len(sample.titles):
                out[v] = hit.scores
            else:
                missing.append(v)
        if missing:
            fresh = self._compute(sample, [suffixes[v] for v in missing])
            rows = []
            for v, row in zip(missing, fresh):
                out[v] = row
                order = [int(i) for i in np.argsort(-row, kind="stable")]
                rows.append((keys[v], Ranking(order=order, scores=[float(x) for x in row])))
            self.cache.put_many(rows)
        return out

    def _compute(self, sample: Sample, suffixes: Sequence[Sequence[int]]) -> np.ndarray:
        """scores() on the model itself (no cache)."""
        import torch
        from transformers import DynamicCache

        from rpp.llm.local import KV_TOKEN_BUDGET, MAX_CANDIDATE_ROWS

        kv = self._prefix_kv(sample)
        n_var, n_before = len(suffixes), len(sample.before)
        tail = [list(s) + list(sample.after) for s in suffixes]
        width = n_before + len(tail[0])
        out = np.full((n_var, len(sample.titles)), -np.inf)
        with torch.inference_mode():
            rows = torch.zeros(n_var, dtype=torch.long)
            cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in kv])
            pos = torch.arange(n_before, width)[None, :].expand(n_var, -1)
            res = self.model(input_ids=torch.tensor(tail), cache=cache, position_ids=pos, use_cache=True,
                             logits_to_keep=1)
            self.counters.forward += 1
            first = torch.log_softmax(res.logits[:, -1, :].float(), dim=-1)
            kv2 = [(layer.keys, layer.values) for layer in res.cache.layers]
            del res, cache
            pairs = [(v, c) for v in range(n_var) for c in range(len(sample.titles)) if sample.titles[c]]
            for v, c in pairs:
                out[v, c] = float(first[v, sample.titles[c][0]])
            per_chunk = max(1, min(MAX_CANDIDATE_ROWS, KV_TOKEN_BUDGET // width))
            for start in range(0, len(pairs), per_chunk):
                chunk = pairs[start:start + per_chunk]
                steps = max(len(sample.titles[c]) for _, c in chunk) - 1
                if steps == 0:
                    continue
                idx = torch.tensor([v for v, _ in chunk])
                cand = torch.full((len(chunk), steps), self.pad, dtype=torch.long)
                cmask = torch.zeros((len(chunk), steps), dtype=torch.long)
                for j, (_, c) in enumerate(chunk):
                    t = sample.titles[c][:-1]
                    if t:
                        cand[j, :len(t)] = torch.tensor(t)
                        cmask[j, :len(t)] = 1
                cache = DynamicCache(ddp_cache_data=[(k[idx], v[idx]) for k, v in kv2])
                mask = torch.cat([torch.ones((len(chunk), width), dtype=torch.long), cmask], dim=1)
                cpos = width + torch.arange(steps)[None, :].expand(len(chunk), -1)
                logits = self.model(input_ids=cand, attention_mask=mask, position_ids=cpos, cache=cache,
                                    use_cache=True).logits.float()
                self.counters.forward += 1
                lse = torch.logsumexp(logits, dim=-1)
                for j, (v, c) in enumerate(chunk):
                    nxt = sample.titles[c][1:]
                    if nxt:
                        got = logits[j, torch.arange(len(nxt)), torch.tensor(nxt)] - lse[j, :len(nxt)]
                        out[v, c] += float(got.sum())
                del cache, logits
        return out

    def gradient(self, sample: Sample, suffix: Sequence[int]) -> np.ndarray:
        """[len(suffix), hidden]: gradient of the target title's NLL w.r.t. the input embedding of each suffix
        slot (the slots before ``after``). Only the suffix, ``after`` and the title run with autograd; the prefix
        is a constant KV cache."""
        import torch
        from transformers import DynamicCache

        if sample.target_index is None:
            raise ValueError("gradient() needs a sample with a target (a training sample)")
        kv = self._prefix_kv(sample)
        title = list(sample.titles[sample.target_index])
        seq = list(suffix) + list(sample.after) + title
        n_slots, n_before = len(suffix), len(sample.before)
        emb = self.model.get_input_embeddings()
        with torch.enable_grad():
            base = emb(torch.tensor([seq])).detach()
            slots = base[:, :n_slots].clone().requires_grad_(True)
            inputs = torch.cat([slots, base[:, n_slots:]], dim=1)
            cache = DynamicCache(ddp_cache_data=[(k.detach().clone(), v.detach().clone()) for k, v in kv])
            pos = torch.arange(n_before, n_before + len(seq))[None, :]
            logits = self.model(inputs_embeds=inputs, cache=cache, position_ids=pos, use_cache=True).logits
            start = n_slots + len(sample.after) - 1  # the column that predicts the title's first token
            logp = torch.log_softmax(logits[0, start:start + len(title)].float(), dim=-1)
            nll = -logp[torch.arange(len(title)), torch.tensor(title)].sum()
            (grad,) = torch.autograd.grad(nll, slots)
        self.counters.forward += 1
        self.counters.backward += 1
        return grad[0].float().numpy()


def surrogate(scores: np.ndarray, target_index: int) -> float:
    """HR@5 + NDCG@5 of the target in the log-likelihood ranking (ties keep the presented order, like the ranker)."""
    rank = np.array([target_rank(order_from_scores(scores.tolist()), target_index)])
    return float(hit_at_k(rank, SURROGATE_K)[0] + ndcg_at_k(rank, SURROGATE_K)[0])


# ---------------------------------------------------------------------------------------------- data


@dataclass
class UserData:
    """One user's search material: a validation sample and training samples, all from the history only."""

    user: object
    val: Sample
    train: list
    token: int
    """The user's token (starts as the initial word)."""
    val_score: float = float("nan")
    """The surrogate on `val` under the current triggers."""


class PapRecSearch:
    """The shared search (fit once, used by both rows) and the per-user search."""

    def __init__(self, ctx: BenchContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg.papprec
        self.counters = Counters()
        self._scorer: Optional[SuffixScorer] = None
        self.shared: list[int] = []
        self.init_token: Optional[int] = None
        self.fitted = False
        self.train_users = 0
        self.rounds: list[dict] = []
        """One record per shared round: position, tried tokens, surrogate before/after, accepted."""
        self.user_round_accepts = 0
        self.train_surrogate: tuple[float, float] = (float("nan"), float("nan"))
        self.fit_s = 0.0
        self.fit_counters = Counters()
        self._mask: Optional[np.ndarray] = None

    # -- plumbing
    @property
    def scorer(self) -> SuffixScorer:
        if self._scorer is None:
            loaded = local_model(self.ctx.ranker)
            identity, cache = response_cache(self.ctx.ranker)
            self._scorer = SuffixScorer(loaded, self.cfg.kv_cache_samples, self.counters, cache=cache,
                                        identity=identity)
            tok = loaded.tokenizer
            self._mask = trigger_vocabulary(tok)
            self.init_token = word_token(tok, self.cfg.init_word)
            if not self._mask[self.init_token]:
                raise BenchmarkError(f"papprec.init_word {self.cfg.init_word!r} is not a whole-word alphabetic "
                                     "token")
            self.shared = [self.init_token] * self.cfg.n_shared
        return self._scorer

    def _sample(self, user: UserSample, n_history: int, target_item=None) -> Sample:
        """The prompt for `user` seeing only history[:n_history]; with `target_item` (history item n_history),
        also the candidates of that held-out history item (BenchContext.history_holdout: it + seeded negatives
        the user never interacted with in the history)."""
        from rpp.prompts import UserContext

        loaded = self.scorer.loaded
        if target_item is not None:
            sample = self.ctx.history_holdout(user, n_history, tag="papprec")
            if sample.target != target_item:
                raise BenchmarkError(f"papprec: history item {n_history} of user {user.user!r} is not the target")
            slot = sample.target_index
        else:
            sample, slot = user, None
        uctx = UserContext.from_sample(sample, self.ctx.dataset)
        prompt = self.ctx.builder.build(uctx, self.ctx.builder.taskwise())
        before, after = split_at_trigger(loaded, prompt.messages)
        from rpp.llm.local import encode

        titles = [encode(loaded, t) for t in uctx.candidate_titles]
        return Sample(before=before, after=after, titles=titles, target_index=slot,
                      key=(repr(user.user), n_history, target_item is None))

    def user_data(self, user: UserSample) -> UserData:
        n = len(user.history)
        positions = self.cfg.train_positions
        if n < positions + 2:
            raise BenchmarkError(f"papprec: user {user.user!r} has {n} history items; train_positions="
                                 f"{positions} needs at least {positions + 2} (raise data.min_history)")
        val = self._sample(user, n - 1, user.history[n - 1])
        train = [self._sample(user, n - 1 - j, user.history[n - 1 - j]) for j in range(1, positions + 1)]
        return UserData(user=user.user, val=val, train=train, token=self.init_token)

    def suffix(self, shared: Sequence[int], token: int) -> list[int]:
        return list(shared) + [int(token)]

    def _top_k(self, grad: np.ndarray, current: int) -> list[int]:
        """HotFlip/AutoPrompt: the k allowed tokens with the largest -e_t . grad (the current token excluded)."""
        import torch

        weights = self.scorer.model.get_input_embeddings().weight
        with torch.inference_mode():
            dots = -(weights.float() @ torch.from_numpy(grad).float()).numpy()
        dots[~self._mask] = -np.inf
        dots[current] = -np.inf
        k = min(self.cfg.top_k, int(np.isfinite(dots).sum()))
        top = np.argpartition(-dots, k - 1)[:k]
        return [int(t) for t in top[np.argsort(-dots[top], kind="stable")]]

    # -- rounds
    def _evaluate(self, data: UserData, shared: Sequence[int], tokens: Sequence[int]) -> list[float]:
        scores = self.scorer.scores(data.val, [self.suffix(shared, t) for t in tokens])
        return [surrogate(row, data.val.target_index) for row in scores]

    def user_round(self, data: UserData) -> bool:
        """One user round: the user's own gradient at the user slot, own top-k, kept only if the user's own
        validation surrogate strictly improves. Returns whether the token changed."""
        suffix = self.suffix(self.shared, data.token)
        grad = sum(self.scorer.gradient(s, suffix)[-1] for s in data.train)
        cands = self._top_k(grad, data.token)
        if not np.isfinite(data.val_score):
            data.val_score = self._evaluate(data, self.shared, [data.token])[0]
        values = self._evaluate(data, self.shared, cands)
        best = int(np.argmax(values))
        if values[best] > data.val_score:
            data.token, data.val_score = cands[best], values[best]
            return True
        return False

    def shared_round(self, users: Sequence[UserData], position: int) -> bool:
        """One shared round at `position`: gradient summed over every training sample, top-k, each candidate
        evaluated on every user's validation sample (with the user's own token); the best is kept if the mean
        surrogate improves."""
        grad = None
        for data in users:
            suffix = self.suffix(self.shared, data.token)
            for s in data.train:
                g = self.scorer.gradient(s, suffix)[position]
                grad = g if grad is None else grad + g
        cands = self._top_k(grad, self.shared[position])
        per_cand = np.zeros((len(cands), len(users)))
        for j, data in enumerate(users):
            variants = []
            for t in cands:
                shared = list(self.shared)
                shared[position] = t
                variants.append(self.suffix(shared, data.token))
            rows = self.scorer.scores(data.val, variants)
            per_cand[:, j] = [surrogate(r, data.val.target_index) for r in rows]
        current = float(np.mean([d.val_score for d in users]))
        means = per_cand.mean(axis=1)
        best = int(np.argmax(means))
        accepted = bool(means[best] > current)
        self.rounds.append({"position": position, "tried": cands, "before": current, "best": float(means[best]),
                            "accepted": accepted})
        if accepted:
            self.shared[position] = cands[best]
            for j, data in enumerate(users):
                data.val_score = float(per_cand[best, j])
        return accepted

    def fit(self) -> None:
        """The shared search on the training users (idempotent: both rows share one fit)."""
        if self.fitted:
            return
        t0, c0 = time.perf_counter(), self.counters.snapshot()
        users = list(self.ctx.train_users[:self.cfg.train_users])
        if not users:
            raise BenchmarkError("papprec needs training users (data.n_train_users > 0, papprec.train_users > 0)")
        self.scorer  # loads the model, the vocabulary mask and the initial tokens
        data = [self.user_data(u) for u in users]
        for d in data:
            d.val_score = self._evaluate(d, self.shared, [d.token])[0]
        start = float(np.mean([d.val_score for d in data]))
        rng = np.random.default_rng([int(self.ctx.seed), 0x9A9])
        failed: set[int] = set()
        for _ in range(self.cfg.max_rounds):
            if self.cfg.n_shared == 0 or len(failed) == self.cfg.n_shared:
                break
            open_positions = [p for p in range(self.cfg.n_shared) if p not in failed]
            position = int(rng.choice(open_positions))
            if self.shared_round(data, position):
                failed.clear()
            else:
                failed.add(position)
            changed = sum(self.user_round(d) for d in data)
            self.user_round_accepts += changed
            if changed:
                failed.clear()  # the users' tokens moved: every position may help again
        self.scorer.clear()
        self.train_users = len(data)
        self.train_surrogate = (start, float(np.mean([d.val_score for d in data])))
        self.fit_s = time.perf_counter() - t0
        self.fit_counters = self.counters - c0
        self.fitted = True

    def rank(self, users: Sequence[UserSample], personal: bool) -> tuple[list[Ranking], list[int]]:
        """Rankings of the test users' own candidates (their targets are never read); with `personal`, each user's
        token is first searched on the user's own history."""
        from tqdm.auto import tqdm

        out, tokens = [], []
        for u in tqdm(users, unit="user", desc="papprec", leave=False, disable=len(users) < 16):
            token = self.init_token
            if personal:
                data = self.user_data(u)
                for _ in range(self.cfg.personal_rounds):
                    if not self.user_round(data):
                        break  # nothing changed: the next round's gradient and candidates would be the same
                token = data.token
            sample = self._sample(u, len(u.history))
            t0 = time.perf_counter()
            scores = self.scorer.scores(sample, [self.suffix(self.shared, token)])[0].tolist()
            out.append(Ranking(order=order_from_scores(scores), scores=scores,
                               prompt_tokens=len(sample.before) + len(self.shared) + 1 + len(sample.after)
                               + sum(len(t) for t in sample.titles), wall_s=time.perf_counter() - t0))
            tokens.append(token)
            self.scorer.clear()
        return out, tokens

    def describe(self, ids: Sequence[int]) -> str:
        tok = self.scorer.loaded.tokenizer
        return " ".join(repr(tok.decode([int(i)])) for i in ids)


def split_at_trigger(loaded, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the ranker's prompt before and after the trigger slot: the end of the last (user) message,
    right before the template's end-of-turn and assistant header. With no trigger, before + after is exactly the
    prompt the ranker scores (checked)."""
    from rpp.llm.local import encode, prompt_text

    marked = [dict(m) for m in messages]
    marked[-1]["content"] = str(marked[-1]["content"]) + _MARKER
    text = prompt_text(loaded, marked)
    if text.count(_MARKER) != 1:
        raise BenchmarkError("papprec: the ranker's chat template does not keep the user's message verbatim")
    head, tail = text.split(_MARKER)
    before, after = encode(loaded, head), encode(loaded, tail)
    if before + after != encode(loaded, prompt_text(loaded, messages)):
        raise BenchmarkError("papprec: the ranker's tokenizer merges the end of the user's message with the chat "
                             "template, so the trigger slot cannot be cut out cleanly")
    return before, after


# ---------------------------------------------------------------------------------------------- the two rows


class PapRecMethod(Method):
    """One PAP-REC row; both rows share one PapRecSearch (the shared tokens are searched once)."""

    uses_llm = True

    def __init__(self, ctx: BenchContext, name: str, search: PapRecSearch, personal: bool) -> None:
        super().__init__(ctx, name)
        self.search = search
        self.personal = bool(personal)
        self.family = "policy" if personal else "optimizer"
        self._rank_cost = Counters()
        self._tokens: list[int] = []
        self._n_test = 0

    def fit(self) -> None:
        self.search.fit()

    def rank(self, users: Sequence[UserSample]) -> list[Ranking]:
        c0 = self.search.counters.snapshot()
        rankings, self._tokens = self.search.rank(users, self.personal)
        self._rank_cost = self.search.counters - c0
        self._n_test = len(users)
        return rankings

    def cost(self) -> dict:
        s = self.search
        return {
            "train_requests": s.fit_counters.requests, "train_users": s.train_users,
            "train_tokens": s.fit_counters.tokens, "infer_tokens": self._rank_cost.tokens,
            "infer_requests": self._rank_cost.requests,
            "forward_passes": s.fit_counters.forward + self._rank_cost.forward,
            "backward_passes": s.fit_counters.backward + self._rank_cost.backward,
            "infer_forward_passes": self._rank_cost.forward, "infer_backward_passes": self._rank_cost.backward,
            "train_s": s.fit_s,
        }

    def notes(self) -> str:
        s = self.search
        if not s.fitted:
            return "not fitted"
        accepted = sum(r["accepted"] for r in s.rounds)
        c = s.cfg
        text = (f"task-wise prompt + {c.n_shared} shared trigger tokens + 1 user token (init {c.init_word!r}), "
                f"top-{c.top_k} HotFlip candidates chosen by HR@5+NDCG@5; shared tokens {s.describe(s.shared)} "
                f"after {len(s.rounds)} shared rounds ({accepted} accepted) and user rounds ({s.user_round_accepts} "
                f"user tokens changed) on {s.train_users} training users' histories; training surrogate "
                f"{s.train_surrogate[0]:.3f} -> {s.train_surrogate[1]:.3f}")
        if self.personal and self._tokens:
            moved = sum(t != s.init_token for t in self._tokens)
            text += (f"; user token searched on each test user's own history (up to {c.personal_rounds} rounds): "
                     f"{moved} of {len(self._tokens)} users moved off the initial token")
        return text


def papprec_methods(ctx: BenchContext) -> list[Method]:
    search = PapRecSearch(ctx)
    return [PapRecMethod(ctx, "papprec_shared", search, personal=False),
            PapRecMethod(ctx, "papprec_personal", search, personal=True)]
