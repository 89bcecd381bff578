"""Reward sources: a reward model or a Python function, behind one small protocol."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import threading
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from tether.algo import append_missing_eos
from tether.models import eos_token_ids, reward_model_scores


class RewardError(ValueError):
    """A reward source returned something unusable; the message names the item."""


class RewardLoadError(RewardError):
    """reward_fn / gold_reward_fn cannot be imported: a configuration problem, found before any model loads."""


class RewardSource(Protocol):
    def score(self, prompts: list[str], responses: list[str], input_ids: Tensor, attention_mask: Tensor,
              columns: Optional[dict[str, list]] = None) -> Tensor:
        """(B,) float32 scores for prompt+response. input_ids/attention_mask are the policy's tokens;
        `columns` maps each other field of the prompt records (e.g. "answer") to one value per row."""
        ...


def source_scores(source, prompts: list[str], responses: list[str], input_ids: Optional[Tensor],
                  attention_mask: Optional[Tensor], columns: Optional[dict[str, list]] = None) -> Tensor:
    """`source.score(...)`, with the record columns only when there are some: a source written for
    responses alone (a model, an older custom class) keeps working on prompts without extra fields."""
    if columns:
        return source.score(prompts, responses, input_ids, attention_mask, columns=columns)
    return source.score(prompts, responses, input_ids, attention_mask)


def rows_of(columns: Optional[dict[str, list]], rows) -> Optional[dict[str, list]]:
    """The record columns of the given rows (a slice or a list of row indices)."""
    if not columns:
        return columns
    if isinstance(rows, slice):
        return {name: values[rows] for name, values in columns.items()}
    return {name: [values[i] for i in rows] for name, values in columns.items()}


class RewardUnavailable(RewardError):
    """The reward source could not answer this time (a hung call, a server that went away): nothing of
    the update reached the weights, so the run stops with a checkpoint and resumes once it is back."""


class RewardTimeout(RewardUnavailable):
    """A reward call ran past reward_timeout_s: the run stops with a checkpoint."""


class FunctionReward:
    """A Python function `list[str] -> list[float]` scoring responses. It is also given, by keyword,
    `prompts=` and any field of the prompt records its signature names (`answer=`, one value per
    response), or all of them when it takes `**kwargs`: a verifiable reward reads its reference there.
    With `timeout_s`, a call that runs longer raises RewardTimeout (the call itself is abandoned in
    its thread: Python cannot stop it)."""

    def __init__(self, fn: Callable, name: str = "", timeout_s: Optional[float] = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", repr(fn))
        try:
            parameters = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # a builtin without a signature: responses alone
            parameters = {}
        self.takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        self.wants_prompts = "prompts" in parameters or self.takes_all
        self.keywords = [name for name, p in list(parameters.items())[1:]
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "prompts"]
        self.required = [name for name, p in list(parameters.items())[1:]
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
                         and name != "prompts"]
        self.timeout_s = timeout_s

    def check_columns(self, available: Sequence[str], source: str = "the prompts") -> None:
        """Before any model loads: every argument the function requires must be a field of the records."""
        missing = [name for name in self.required if name not in available]
        if missing:
            raise RewardLoadError(f"reward {self.name} takes {missing[0]!r}, which is not a field of {source} (their "
                                  f"fields: {sorted(available) or 'none besides the prompt'}); add that field to "
                                  "every record, or give the argument a default")

    def score(self, prompts, responses, input_ids=None, attention_mask=None, columns=None) -> Tensor:
        columns = columns or {}
        try:
            raw = self._call_in_time(prompts, responses, columns)
        except SystemExit as err:  # would end tether mid-run, exit code and all, without a checkpoint
            raise RewardError(f"reward {self.name} called sys.exit({err.code}) while scoring {len(responses)} "
                              "responses; a reward function must return scores (raise an exception to stop)") from err
        except RewardTimeout:
            raise
        except Exception as err:  # the user's code: find the response it fails on, and name it
            raise RewardError(self._failure(prompts, responses, columns, err)) from err
        return check_scores(raw, responses, self.name)

    def _call(self, prompts, responses, columns):
        kwargs = {name: values for name, values in columns.items()
                  if (self.takes_all or name in self.keywords) and name not in ("prompts", "responses")}
        if self.wants_prompts:
            kwargs["prompts"] = prompts
        return self.fn(responses, **kwargs)

    def _call_in_time(self, prompts, responses, columns):
        """The call, in a daemon thread when a timeout is set (a hung call must not keep the process alive)."""
        if self.timeout_s is None:
            return self._call(prompts, responses, columns)
        box: dict = {}

        def run():
            try:
                box["value"] = self._call(prompts, responses, columns)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread as it is
                box["error"] = err

        worker = threading.Thread(target=run, name=f"reward {self.name}", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise RewardTimeout(f"reward {self.name} did not return within reward_timeout_s={self.timeout_s:g} s "
                                f"while scoring {len(responses)} responses (first: {responses[0][:100]!r}); fix the "
                                "function, or raise reward_timeout_s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _failure(self, prompts, responses, columns, err: Exception) -> str:
        for i, response in enumerate(responses):
            try:
                self._call(prompts[i : i + 1], [response], rows_of(columns, slice(i, i + 1)))
            except Exception as single:
                return (f"reward {self.name} raised {type(single).__name__}: {single} on response {i} "
                        f"{response[:200]!r} (prompt {prompts[i][:100]!r}); fix the function for that input")
        return (f"reward {self.name} raised {type(err).__name__}: {err} at {raised_at(err)} on the batch of "
                f"{len(responses)} responses (first: {responses[0][:100]!r}), while each response alone scores "
                "fine: the failure depends on the batch (its size, or state kept between calls); fix the function "
                "for a whole batch")


class WeightedRewards:
    """Several reward sources summed with weights into one score: `Σ_k w_k · score_k`.

    `scored` also returns each source's own scores (unweighted, (B, K)), so the trainer logs each
    as `reward/<name>` and a rule that only one of them moves is visible. Names and the weight count
    are checked with the config (config._check_reward_source), before anything is built."""

    def __init__(self, sources: Sequence, names: Sequence[str], weights: Optional[Sequence[float]] = None):
        self.sources, self.names = list(sources), list(names)
        self.weights = [float(w) for w in weights] if weights else [1.0] * len(self.sources)
        self.name = " + ".join(f"{w:g}·{n}" for w, n in zip(self.weights, self.names))

    def scored(self, prompts, responses, input_ids=None, attention_mask=None, columns=None) -> tuple[Tensor, Tensor]:
        """((B,) weighted sum, (B, K) each source's scores)."""
        parts = torch.stack([source_scores(source, prompts, responses, input_ids, attention_mask, columns).float().cpu()
                             for source in self.sources], dim=1)  # (B, K)
        return parts @ torch.tensor(self.weights, dtype=parts.dtype), parts

    def score(self, prompts, responses, input_ids=None, attention_mask=None, columns=None) -> Tensor:
        return self.scored(prompts, responses, input_ids, attention_mask, columns)[0]


def scores_and_parts(source, prompts, responses, input_ids, attention_mask,
                     columns=None) -> tuple[Tensor, Optional[Tensor]]:
    """(B,) scores of any source, and (B, K) the parts of a WeightedRewards (None for one source)."""
    if isinstance(source, WeightedRewards):
        return source.scored(prompts, responses, input_ids, attention_mask, columns)
    return source_scores(source, prompts, responses, input_ids, attention_mask, columns), None


def reward_part_names(source) -> list[str]:
    """The names a WeightedRewards logs its parts under (reward/<name>); none for a single source."""
    return list(source.names) if isinstance(source, WeightedRewards) else []


def raised_at(err: BaseException) -> str:
    """'file.py:line in function' of the innermost frame: where in the user's code the error came from."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return "an unknown place"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno} in {last.name}"


def check_scores(raw: Sequence[float], responses: list[str], name: str) -> Tensor:
    """Never let a wrong count from a reward reach training. A NaN/inf is passed on: the trainer
    skips that update (and names the response), as it does for every other non-finite value."""
    if isinstance(raw, (dict, str, bytes)) or not hasattr(raw, "__iter__"):  # a dict iterates over its keys
        raise RewardError(f"reward {name} must return a list of numbers (one per response), got "
                          f"{type(raw).__name__}")
    try:
        values = [float(v) for v in raw]
    except (TypeError, ValueError) as err:
        raise RewardError(f"reward {name} must return a list of numbers, got {type(raw).__name__}: {err}") from err
    if len(values) != len(responses):
        raise RewardError(f"reward {name} returned {len(values)} scores for {len(responses)} responses")
    return torch.tensor(values, dtype=torch.float32)


def load_reward_fn(spec: str, timeout_s: Optional[float] = None) -> FunctionReward:
    """'package.module:function' or 'path/to/file.py:function'."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise RewardLoadError(f"reward_fn must look like 'module:function', got {spec!r}")
    if module_name.endswith(".py"):
        module = _module_from_file(module_name)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise RewardLoadError(f"reward_fn {spec!r}: cannot import module {module_name!r} ({err})") from err
        except Exception as err:
            raise RewardLoadError(f"reward_fn {spec!r}: module {module_name!r} fails to import: "
                                  f"{type(err).__name__}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardLoadError(f"reward_fn {spec!r}: module {module_name!r} has no function {attr!r}")
    return FunctionReward(fn, name=spec, timeout_s=timeout_s)


def _module_from_file(path: str):
    file = Path(path)
    if not file.is_file():
        raise RewardLoadError(f"reward_fn file not found: {path}")
    # Registered under a name of its own while it runs: a @dataclass (or pickle) in the file looks
    # its module up in sys.modules, and no installed module of the same name is shadowed.
    name = f"tether_reward_fn_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's module fails to import: say which and why, in one line
        del sys.modules[name]
        raise RewardLoadError(f"reward_fn file {path} fails to import: {type(err).__name__}: {err}") from err
    return module


class ModelReward:
    """An AutoModelForSequenceClassification (one label) scoring prompt+response.

    With its own tokenizer the text is decoded from the policy's tokens and re-encoded,
    so the reward model need not share the policy's vocabulary (unlike TRL, #3595).
    With ``eos`` = (ids that end a text, id to append, pad id) every sequence is scored
    ending in EOS, the format `tether reward` trains on; None scores the text as it is.
    """

    def __init__(self, model, tokenizer=None, max_length: int = 1024, batch_size: int = 16,
                 eos: Optional[tuple[list[int], int, int]] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer  # None: same tokenizer as the policy, reuse its ids
        self.max_length = max_length
        self.batch_size = batch_size
        self.eos = eos
        self._end_ids = torch.tensor(eos[0]) if eos is not None else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(self, prompts, responses, input_ids, attention_mask, columns=None) -> Tensor:
        if self.tokenizer is None:
            ids, mask = input_ids, attention_mask
        else:
            ids, mask = self._encode([p + r for p, r in zip(prompts, responses)])
        if self.eos is not None:
            _, eos_id, pad_id = self.eos
            ids, mask = append_missing_eos(ids, mask, self._end_ids, eos_id, pad_id)
        chunks = [
            reward_model_scores(self.model, ids[i : i + self.batch_size].to(self.device),
                                mask[i : i + self.batch_size].to(self.device))
            for i in range(0, ids.shape[0], self.batch_size)
        ]
        scores = torch.cat(chunks).cpu()
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise RewardError(f"reward model produced a non-finite score for item {bad[0]}: {responses[bad[0]][:200]!r}")
        return scores

    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        # Right side of the text matters most to the score: truncate on the left.
        self.tokenizer.truncation_side = "left"
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        return enc["input_ids"], enc["attention_mask"]


def reward_eos(tokenizer, policy=None) -> Optional[tuple[list[int], int, int]]:
    """(ids that already end a text, the EOS to append, pad id) for the reward model's input.

    `tether reward` trains on texts that end in EOS, so responses cut at max_new_tokens get
    one before scoring. With the policy's ids reused, its generation EOS ids also count as an end.
    """
    if tokenizer.eos_token_id is None:
        return None
    ends = eos_token_ids(tokenizer, policy)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ends, tokenizer.eos_token_id, pad
