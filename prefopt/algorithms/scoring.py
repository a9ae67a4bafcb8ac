"""One reward `Scorer` for every caller (PPO's rewards, `prefopt label`), from the reward settings.

    check_reward(cfg, for_ppo=False)         seconds-long checks of cfg.reward, before anything starts
    scorer = start_scorer(cfg, console)      the reward role's ranks started if it has any
    pending = scorer.score_async(prompts, completions)   # texts; computing while the caller goes on
    scores = pending.wait()                  one float per completion
    scorer.description                       what the scores depend on (a score cache's key)
    scorer.shutdown()

reward.source decides what scores:
  task   the built-in task's ground truth, computed on the controller (at score_async);
  model  a reward model (a ...ForSequenceClassification with one label) on the reward role's
         ranks, each re-tokenizing prompt + completion with the reward model's own tokenizer;
  judge  an LLM judge read through its answer-token probabilities: a causal LM on the reward
         role's ranks, or one served behind reward.judge.endpoint (prefopt.algorithms.judge_http).
         mode rating asks one question per completion; pairwise asks every ordered pair of the
         completions of one prompt (both orders, so a position preference cancels) and scores each
         completion by its mean probability of winning.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from prefopt.algorithms.stages import PreflightError
from prefopt.config import RunConfig


class RewardSettingsError(PreflightError):
    """The reward settings cannot score here; the message names the field to change."""


# ----------------------------------------------------------------------------- checks


def check_reward(cfg: RunConfig, for_ppo: bool) -> None:
    """What can be checked of cfg.reward in seconds, before any data is read: the task exists, the
    reward model has a one-output scalar head, the judge is a model directory or its endpoint
    answers with the model. PPO takes no judge."""
    source = cfg.reward.source
    if source == "judge" and for_ppo:
        raise RewardSettingsError("reward.source: judge scores with prefopt label; PPO takes reward.source: task "
                                  "(the task's ground truth) or model (a trained reward model)")
    if source == "task" and cfg.data.task is None:
        raise RewardSettingsError("reward.source: task needs a built-in task (data.task); or use reward.source: "
                                  "model with reward.model_path")
    if source == "model":
        check_reward_model(cfg.reward.model_path)
    elif source == "judge" and cfg.reward.judge.endpoint:
        from prefopt.algorithms import judge_http

        judge_http.check_endpoint(cfg.reward.judge)
    elif source == "judge":
        from prefopt.models.model_dir import model_config

        model_config(cfg.reward.model_path, "reward.model_path (the judge, a causal LM)", RewardSettingsError)


def check_reward_model(model_path: str) -> dict:
    """The reward model's config.json; refuses a directory without a one-output scalar head."""
    from prefopt.models.model_dir import check_reward_model as check

    return check(model_path, "reward.model_path", RewardSettingsError)


# ----------------------------------------------------------------------------- what the scores depend on


def describe(cfg: RunConfig) -> dict:
    """What fingerprints a scorer's scores (canonical JSON of it keys a score cache)."""
    if cfg.reward.source == "task":
        return {"source": "task", "task": cfg.data.task}
    # What the judge is asked; how it is reached (timeouts, concurrency, the key) changes no score.
    asked = cfg.reward.judge.model_dump(mode="json", include={"mode", "template", "answers"})
    if cfg.reward.source == "judge" and cfg.reward.judge.endpoint:
        # The served weights cannot be fingerprinted from here: the endpoint and model name stand for them.
        return {"source": "judge", "endpoint": cfg.reward.judge.endpoint, "model": cfg.reward.judge.model,
                "judge": asked}
    from prefopt.refcache.fingerprint import weights_fingerprint

    described = {"source": cfg.reward.source, "model_path": str(Path(cfg.reward.model_path).resolve()),
                 "reward_weights": weights_fingerprint(cfg.reward.model_path)}
    if cfg.reward.source == "judge":
        described["judge"] = asked
    return described


def fingerprint(description: dict) -> str:
    """Hex sha256 of a scorer's description as canonical JSON."""
    canonical = json.dumps(description, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def needs_ranks(cfg: RunConfig) -> bool:
    """Whether the scorer runs on the reward role's ranks (Ray must be connected to start it)."""
    from prefopt.algorithm_spec import scores_on_ranks

    return scores_on_ranks(cfg)


# ----------------------------------------------------------------------------- scores in flight


class Ready:
    """Scores computed already (a task's, on the controller)."""

    refs = ()  # nothing in flight (prefopt.cluster.worker_group.as_completed yields it at once)

    def __init__(self, scores: list[float]):
        self.scores = scores

    def wait(self) -> list[float]:
        return self.scores


class Then:
    """A call in flight (anything with wait(), or a Future) whose results `then` turns into scores."""

    def __init__(self, pending, then: Callable[[list], list[float]] = list):
        self.pending, self.then = pending, then

    @property
    def refs(self) -> list:
        """The Ray refs of a split call in flight, so as_completed can wait on it with others."""
        return getattr(self.pending, "refs", [])

    def wait(self) -> list[float]:
        done = self.pending.result() if isinstance(self.pending, Future) else self.pending.wait()
        return self.then(done)


def pairwise_scores(prompt_index: Sequence[int], p_first: dict[tuple[int, int], float]) -> list[float]:
    """Each completion's score from a pairwise judge: its mean probability of beating the other
    completions of its prompt. p_first[(i, j)]: the judge's p(the first shown wins) with i shown
    first. P(i beats j) = (p_first[i, j] + 1 - p_first[j, i]) / 2: both orders, averaged, so a
    judge that only prefers a position gives 0.5 (RLAIF, arXiv 2309.00267)."""
    by_prompt: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompt_index):
        by_prompt.setdefault(prompt, []).append(row)
    scores = [0.5] * len(prompt_index)
    for rows in by_prompt.values():
        for i in rows:
            others = [j for j in rows if j != i]
            if others:
                scores[i] = sum((p_first[i, j] + 1 - p_first[j, i]) / 2 for j in others) / len(others)
    return scores


class Scorer:
    """One number per completion (see the module docstring); made by `start_scorer`.

    description: what the scores depend on. per_completion: whether a completion's score depends
    on it alone (not a pairwise judge's), so scores may be looked up per completion. chunk: how
    many completions one call should hold for a progress bar to move (a few calls per rank)."""

    def __init__(self, cfg: RunConfig, start_group: Callable[[], object] | None = None):
        self.cfg, self.group, self._start_group = cfg, None, start_group
        self.description = describe(cfg)
        self.source = cfg.reward.source
        judge = cfg.reward.judge
        self.per_completion = not (self.source == "judge" and judge.mode == "pairwise")
        role = cfg.reward_role
        self.chunk = role.score_batch * role.num_workers * 8 if needs_ranks(cfg) else 256
        self._task = None
        if self.source == "task":
            from prefopt.tasks import get_task

            self._task = get_task(cfg.data.task)
        self._http = ThreadPoolExecutor(1) if self.source == "judge" and judge.endpoint else None

    def _ranks(self):
        """The reward role's group, started at the first call that needs it."""
        if self.group is None:
            self.group = self._start_group()
        return self.group

    def score_async(self, prompts: list[str], completions: list[str], groups: Sequence[int] | None = None):
        """Score completions[i] as the answer to prompts[i] -> a handle whose wait() gives one float
        per completion. groups[i]: which prompt completion i answers (a pairwise judge compares the
        completions of one group; default: the prompt's text)."""
        if self._task is not None:
            return Ready([float(x) for x in self._task.reward(list(prompts), list(completions))])
        if self.source == "model":
            items = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
            return Then(self._ranks().split_async("score_texts", items))
        return self._judge_async(prompts, completions, groups if groups is not None else list(prompts))

    def score(self, prompts: list[str], completions: list[str], groups: Sequence[int] | None = None) -> list[float]:
        return self.score_async(prompts, completions, groups).wait()

    def _judge_async(self, prompts, completions, groups):
        judge = self.cfg.reward.judge
        if judge.mode == "rating":
            keys = list(range(len(prompts)))
            questions = [judge.template.format(prompt=p, completion=c) for p, c in zip(prompts, completions, strict=True)]
        else:
            keys = [(i, j) for i in range(len(prompts)) for j in range(len(prompts)) if i != j and groups[i] == groups[j]]
            questions = [judge.template.format(prompt=prompts[i], a=completions[i], b=completions[j]) for i, j in keys]
        answers = list(judge.answers)
        if self._http is not None:
            from prefopt.algorithms import judge_http

            pending = self._http.submit(judge_http.score, judge, questions, answers)
        else:
            pending = self._ranks().split_async("judge", questions, answers)
        if judge.mode == "rating":
            return Then(pending)
        return Then(pending, lambda probs: pairwise_scores(list(groups), dict(zip(keys, probs, strict=True))))

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None
        if self._http is not None:
            self._http.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_scorer(cfg: RunConfig, console, lazy: bool = False) -> Scorer:
    """The scorer of cfg.reward, its ranks (the reward role, when it has any) started now, or at
    its first call with lazy (then a run that finds every score in a cache starts none). Settings
    are checked by check_reward, before."""
    if not needs_ranks(cfg):
        return Scorer(cfg)
    from prefopt.algorithm_spec import reward_role
    from prefopt.algorithms import stages

    def start_group():
        stages.connect(cfg, roles=[reward_role(cfg)])  # nothing to do when connected already
        return stages.start_reward(cfg, console, "scalar" if cfg.reward.source == "model" else "lm")

    scorer = Scorer(cfg, start_group)
    if not lazy:
        scorer._ranks()
    return scorer
