"""`rpp benchmark`: every configured method on the same test users, candidates and ranker; stats; the report.

Protocol (what makes the comparison honest):
- Test users are ``split.test`` (the first ``eval.n_users`` of them when set: the quick mode). They are disjoint
  from the validation users methods tune on and from the training users; trained runs are checked against their
  own saved split too.
- Methods are fitted before any test user is ranked, through a context that holds no test users.
- The reference for the paired tests is the task-wise prompt (default or LLMRank-style) with the best NDCG@10 on
  the VALIDATION users, never the best on the test users, which would flatter the reference by selection.
- One ranker (one model, one response cache) serves every LLM method, through a meter that counts requests and
  tokens whether the model or the cache answered them.
"""
from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import yaml

from rpp.benchmark.methods import BenchContext, BenchmarkError, Method, build_methods, ranks_of
from rpp.benchmark.report import (
    Meter, MethodResult, cost_markdown, df_markdown, markdown_table, per_user_table, plot_ndcg,
    plot_position_bias, refiner_markdown, results_table,
)
from rpp.config import Config, redact
from rpp.llm.base import Ranker, Ranking
from rpp.llm.failures import FailureBudgetExceeded, FailureLog
from rpp.metrics import bootstrap_ci, check_above_random, ndcg_at_k, paired_test



class MeteredRanker(Ranker):
    """Forwards to the real ranker and counts what each method asked of it.

    The wrapped ranker's UsageTracker counts only what the model answered (cache hits apart); a benchmark must
    also report what a method costs on a cold cache, so requests and the tokens recorded on every returned
    Ranking are counted here too. `identity` and `usage` are the wrapped ranker's, so the cache and anything
    reading usage see the real ranker.
    """

    def __init__(self, inner: Ranker, failures: Optional[FailureLog] = None) -> None:
        self.inner = inner
        self.failures = failures or FailureLog()
        """The benchmark's per-method failure phases ("fit: NAME", "rank: NAME"), with the budget."""
        self.identity = inner.identity
        self.usage = inner.usage
        self.meter = Meter()
        self.batches = 0

    def rank(self, requests):
        rankings = self.inner.rank(requests)
        self.batches += 1
        m = self.meter
        for r in rankings:
            m.requests += 1
            m.paid_calls += int(not r.cached)
            m.cache_hits += int(r.cached)
            m.failures += int(r.failed)
            m.prompt_tokens += int(r.prompt_tokens)
            m.completion_tokens += int(r.completion_tokens)
        self.failures.observe(rankings)  # over budget: FailureBudgetExceeded, the method's row becomes INVALID
        return rankings

    def snapshot(self) -> Meter:
        return Meter(**vars(self.meter))

    def close(self) -> None:
        self.inner.close()


def _failed_flags(rankings: Sequence) -> np.ndarray:
    """Per user: did the ranker fail (only Ranking outputs can say so; plain orders never failed)."""
    return np.array([bool(isinstance(r, Ranking) and r.failed) for r in rankings], dtype=bool)


def _cores() -> str:
    total = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        usable = total
    return f"{usable} usable of {total} logical cores ({platform.machine()}, {platform.system()})"


def _command_line(command: Optional[str], subcommand: str = "benchmark") -> str:
    """The command as the user typed it when run from the `rpp` CLI (program name without its install path)."""
    if command:
        return command
    argv = list(sys.argv)
    if argv and subcommand in argv[1:2]:
        return " ".join(["rpp"] + [shlex.quote(a) for a in argv[1:]])
    return f"run_{subcommand}(cfg) from Python (no CLI command)"


def run_benchmark(cfg: Config, *, ranker: Optional[Ranker] = None, command: Optional[str] = None,
                  progress=None) -> Path:
    """Run the benchmark described by `cfg` and write its report; returns the report folder.

    `ranker`: share an already loaded ranker (tests, notebooks); by default one is made from cfg on first use.
    `command`: the command line to record in the report (default: taken from sys.argv when run by the CLI).
    """
    from rpp.data import load_dataset, split_users

    say = progress or (lambda msg: print(msg, flush=True))
    t_start = time.perf_counter()
    out_dir = Path(cfg.benchmark.output_dir) / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)

    dataset = load_dataset(cfg.data)
    split = split_users(dataset, cfg.data, cfg.seed)
    test_users = split.test if cfg.eval.n_users is None else split.test[:cfg.eval.n_users]
    if not test_users:
        raise BenchmarkError("no test users: set data.n_test_users (and eval.n_users, if given) above 0")
    fit_users = split.val[:cfg.benchmark.enumeration_val_users]
    test_ids = {u.user for u in test_users}
    if test_ids & {u.user for u in split.val + split.train}:  # split_users guarantees it; a benchmark re-checks
        raise BenchmarkError("test users overlap validation or training users")

    failures = FailureLog()

    def make() -> Ranker:
        if ranker is not None:
            return MeteredRanker(ranker, failures)
        from rpp.llm import make_ranker

        return MeteredRanker(make_ranker(cfg), failures)

    ctx = BenchContext(cfg=cfg, dataset=dataset, fit_users=list(fit_users),
                       train_interactions=split.train_interactions, ranker_factory=make,
                       train_users=list(split.train))
    methods = build_methods(ctx, cfg.benchmark.methods, cfg.benchmark.runs)
    say(f"benchmark '{cfg.name}': {len(methods)} methods on {len(test_users)} test users "
        f"({len(fit_users)} validation users for choices)")

    def meter() -> Meter:
        return ctx.ranker.snapshot() if ctx.has_ranker else Meter()

    results: list[MethodResult] = []
    fitted: list[Method] = []
    invalid: Optional[tuple[str, FailureBudgetExceeded]] = None
    budget = cfg.llm.max_failure_rate
    for m in methods:
        m0, t0 = meter(), time.perf_counter()
        try:
            with failures.phase(f"fit: {m.name}", budget):
                m.fit()
            m1, t1 = meter(), time.perf_counter()
            with failures.phase(f"rank: {m.name}", budget):
                rankings = m.rank(list(test_users))
        except FailureBudgetExceeded as exc:
            # the rows that completed are kept; this one is INVALID and the run stops (the server is failing)
            invalid = (m.name, exc)
            say(f"  {m.name:28s} INVALID: {exc}")
            break
        m2, t2 = meter(), time.perf_counter()
        ranks = ranks_of(test_users, rankings)
        res = MethodResult(name=m.name, family=m.family, notes=m.notes(), ranks=ranks,
                           failed=_failed_flags(rankings),
                           fit_usage=m1 - m0, infer_usage=m2 - m1, fit_s=t1 - t0, rank_s=t2 - t1,
                           val_ndcg10=m.val_ndcg10, training_usage=m.training_usage(),
                           refiner=m.refiner_stats(), cost=m.cost())
        results.append(res)
        fitted.append(m)
        say(f"  {m.name:28s} NDCG@10 {res.metrics['ndcg@10'].mean():.4f}  "
            f"(fit {t1 - t0:.1f} s, rank {t2 - t1:.1f} s, {res.infer_usage.requests} requests; "
            f"{int(res.failed.sum())} of {len(test_users)} test users failed)")

    reference = _choose_reference(fitted)
    table = results_table(results, reference.name if reference else None, n_boot=cfg.eval.n_bootstrap,
                          seed=cfg.seed, n_fit_users=len(fit_users))
    rows = [table.assign(status="ok")]
    if invalid is not None:  # excluded from every statistic and paired test; kept in results.csv as INVALID
        rows.append(pd.DataFrame([{"method": invalid[0], "status": "INVALID", "error": str(invalid[1])}]))
    per_user = per_user_table(test_users, results)
    pd.concat(rows, ignore_index=True).to_csv(out_dir / "results.csv", index=False, float_format="%.6g")
    per_user.to_csv(out_dir / "per_user.csv", index=False, float_format="%.6g")
    cfg.save(out_dir / "config.yaml")
    plot_ndcg(table, reference.name if reference else None, out_dir / "ndcg10.png")
    bias = plot_position_bias(per_user, cfg.data.n_candidates, out_dir / "position_bias.png")
    sanity = _sanity_check(ctx, reference, cfg)
    total_s = time.perf_counter() - t_start
    identity = ctx.ranker.identity if ctx.has_ranker else None
    _write_markdown(out_dir, cfg, table, results, reference, sanity, bias, len(test_users), len(fit_users),
                    total_s, _command_line(command), identity, failures, invalid)
    for line in failures.report_lines():
        say(f"  failures, {line}")
    say(f"report: {out_dir / 'report.md'} ({total_s:.1f} s)")
    if invalid is not None:
        raise FailureBudgetExceeded(f"benchmark stopped, row '{invalid[0]}' is INVALID: {invalid[1]}; the "
                                    f"{len(results)} completed rows are in {out_dir / 'report.md'}", invalid[1].phase)
    return out_dir


def _choose_reference(methods: Sequence[Method]) -> Optional[Method]:
    """The task-wise prompt with the highest mean NDCG@10 on the validation users (first one on ties)."""
    taskwise = [m for m in methods if m.family == "taskwise" and m.val_ndcg10 is not None]
    if not taskwise:
        return None
    return max(taskwise, key=lambda m: m.val_ndcg10)  # max keeps the first of ties


def _sanity_check(ctx: BenchContext, reference: Optional[Method], cfg: Config) -> Optional[dict]:
    """Does the reference prompt's ranker beat random and popularity on the validation users? Rewards from a
    ranker at chance level are noise, so every result is reported with this check (reusing the validation ranks
    the reference already computed: no extra LLM calls). The verdict is the one training uses
    (``rpp.metrics.check_above_random``: the bootstrap CI of the mean gain over the exact random expectation)."""
    if reference is None or getattr(reference, "val_ranks", None) is None:
        return None
    from rpp.benchmark.classic import PopularityScorer

    failed = getattr(reference, "val_failed", None)
    answered = ~failed if failed is not None else np.ones(len(ctx.fit_users), dtype=bool)
    requests_line = f"{int((~answered).sum())} of {len(answered)} requests failed"
    users = [u for u, ok in zip(ctx.fit_users, answered) if ok]
    if not users:
        return {"requests_line": requests_line, "users": 0, "passes": False}
    val_ranks = np.asarray(reference.val_ranks)[answered]
    llm = ndcg_at_k(val_ranks, 10)
    pop = ndcg_at_k(ranks_of(users, PopularityScorer(ctx.train_interactions).rank(users)), 10)
    n_boot, seed = cfg.eval.n_bootstrap, cfg.seed
    vs_random = check_above_random(val_ranks, [len(u.candidates) for u in users], k=10, n_boot=n_boot,
                                   seed=seed)
    return {
        "requests_line": requests_line, "users": len(users), "prompt": reference.name,
        "llm": bootstrap_ci(llm, n_boot, seed=seed), "random": vs_random.random,
        "popularity": bootstrap_ci(pop, n_boot, seed=seed),
        "vs_random": vs_random, "vs_popularity": paired_test(llm, pop),
        "passes": vs_random.passes,
    }


def _write_markdown(out_dir: Path, cfg: Config, table, results: Sequence[MethodResult], reference,
                    sanity: Optional[dict], bias, n_test: int, n_fit: int, total_s: float, command: str,
                    ranker_identity: Optional[str], failures: Optional[FailureLog] = None,
                    invalid: Optional[tuple] = None) -> None:
    ref_name = reference.name if reference else None
    lines = [f"# Benchmark `{cfg.name}`", ""]
    lines += [
        f"{n_test} test users of {cfg.data.dataset} (seed {cfg.seed}), {cfg.data.n_candidates} candidates each "
        f"(the held-out item + {cfg.data.n_candidates - 1} {cfg.data.negatives} negatives, target at a seeded "
        f"random slot). Every method ranks the same users' same candidate lists; every LLM method uses the same "
        f"ranker ({cfg.llm.backend} `{cfg.llm.model}`, {cfg.llm.mode} mode"
        + (f", {cfg.llm.score_reduction} of title log-probs" if cfg.llm.mode == "score" else "")
        + f", candidate list {'shown' if cfg.prompt.show_candidates or cfg.llm.mode == 'generate' else 'not shown'}"
        f" in the prompt).",
        "",
    ]
    if ranker_identity:
        lines += [f"Ranker identity (part of every cache key): `{ranker_identity}`.", ""]
    if n_test < 300:
        lines += [f"**Quick run: only {n_test} test users.** Differences of a few NDCG points are not detectable "
                  f"at this size; the full benchmark uses >= 300.", ""]
    if ref_name:
        lines += [f"Reference for the paired tests: **{ref_name}**, the task-wise prompt with the best NDCG@10 on "
                  f"the {n_fit} validation users (chosen before any test user was ranked, so the reference is "
                  f"not flattered by selection on the test set). `rel. vs ref` = mean NDCG@10 / reference mean "
                  f"- 1; `p` = two-sided Wilcoxon signed-rank test on per-user NDCG@10 (zero differences "
                  f"dropped).", ""]
    else:
        lines += ["No task-wise method was run, so there is no reference and no paired test.", ""]
    lines += ["## Results", "", markdown_table(table, ref_name), ""]
    if invalid is not None:
        lines += [f"**INVALID: `{invalid[0]}`** stopped over the failure budget and is excluded from every "
                  f"statistic and paired test: {invalid[1]}. Methods after it were not run.", ""]
    failed_rows = [(r.name, int(r.failed.sum())) for r in results if r.failed.any()]
    if failed_rows:
        lines += ["Failed test users (under the failure budget llm.max_failure_rate="
                  f"{cfg.llm.max_failure_rate:g}): " + ", ".join(f"{n}: {k} of {n_test}" for n, k in failed_rows)
                  + ". A failed user's request is ranked in PRESENTED order (the candidate list as shown) and "
                  "counted in the row's mean.", ""]
    if failures is not None and failures.phases:
        lines += ["Ranker requests per phase: " + "; ".join(failures.report_lines()) + ".", ""]
    lines += [
        "Columns: metrics are means over test users with 95% percentile-bootstrap CIs "
        f"({cfg.eval.n_bootstrap} resamples, seed {cfg.seed}; all CIs in results.csv). `val NDCG@10`: on the "
        "validation users, where the method chose something there. `train req.`: LLM ranking requests spent "
        "before ranking test users (choosing on validation users; for a trained policy, plus its training run's "
        "requests when its run directory records them). `infer req./user`, `infer tok./user`: per test user "
        "(prompt + completion tokens as the ranker reports them). Requests count cache answers too, so they are "
        "what a method costs on a cold cache. `failed`: test users whose LLM request failed (ranked in presented "
        "order). `wall s`: fit + rank time in this run (a warm response cache makes it much shorter).",
        "",
    ]
    lines += refiner_markdown(results)
    lines += cost_markdown(results)
    lines += ["## Methods", ""]
    for r in results:
        lines.append(f"- **{r.name}** ({r.family}): {r.notes}")
    lines.append("")
    lines += ["## Ranker sanity check (validation users)", ""]
    if sanity is None:
        lines += ["Skipped: no task-wise prompt was run.", ""]
    elif not sanity["users"]:
        lines += [f"{sanity['requests_line']}: no answered request, nothing to check.", ""]
    else:
        verdict = "PASSES" if sanity["passes"] else "FAILS"
        gain = sanity["vs_random"].gain
        lines += [
            f"{sanity['requests_line']}; on the {sanity['users']} answered validation users, prompt `{sanity['prompt']}`: NDCG@10 LLM {sanity['llm']}, "
            f"random {sanity['random']:.4f} (exact expectation), popularity {sanity['popularity']}. LLM - random: "
            f"{gain.mean:+.4f} [{gain.low:+.4f}, {gain.high:+.4f}] (mean per-user gain, 95% bootstrap CI); LLM vs "
            f"popularity: {sanity['vs_popularity'].mean_diff:+.4f} (p = {_p(sanity['vs_popularity'].p_value)}). "
            f"The check {verdict} (the gain's CI above 0 and a gain of at least "
            f"+{sanity['vs_random'].threshold:.2f}, the check training runs too)."
            + ("" if sanity["passes"] else " Rewards from this ranker are close to noise; read every LLM row "
               "with that in mind."),
            "",
        ]
    lines += ["## Position bias", "",
              "Mean NDCG@10 by the target's (1-based) slot in the presented candidate list "
              "(`position_bias.png`; per-user rows in `per_user.csv`).", "",
              df_markdown(bias, 3, "method"), "",
              "![NDCG@10 per method](ndcg10.png)", "", "![position bias](position_bias.png)", ""]
    lines += ["## Reproduce", "", "Command that produced this report:", "", f"    {command}", "",
              "Equivalent, from the resolved config saved next to this report:", "",
              f"    rpp benchmark --config {(out_dir / 'config.yaml').as_posix()}", "",
              "Resolved config:", "", "```yaml",
              yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False).rstrip(), "```", ""]
    lines += ["## Machine and notes", "",
              f"- Cores: {_cores()}; Python {platform.python_version()}; total wall time {total_s:.1f} s.",
              "- Trained policies and the random policy report the LAST step's ranking of a T-step episode; "
              "their inference cost is T requests per user.",
              "- Enumeration and the choice of the reference prompt use only validation users; test users are "
              "ranked once per method, after fitting.",
              "- BPR-MF and popularity train on `split.train_interactions` (every user's held-out last "
              "interaction removed), so no test target is seen in training.", ""]
    (out_dir / "report.md").write_text("\n".join(lines))


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else "< 1e-4"
