"""A reward server over HTTP as a reward source (`reward_url=`): one reward model serves many runs.

The protocol, one POST per batch of at most `batch_size` rows (`concurrency` batches in flight):

    POST <reward_url>                      Content-Type: application/json
    {"prompts": ["...", ...], "responses": ["...", ...], "columns": {"answer": [...], ...}}

    200 OK                                 Content-Type: application/json
    {"scores": [0.73, -1.2, ...]}          one number per response, in order

`columns` holds the prompt records' other fields, one value per row ({} when there are none).
The answer's key may also be "rewards" (what OpenRLHF's remote reward servers return).
`tether serve-reward RUN_DIR/final` serves a trained reward model this way
(tether/pipelines/serve_reward.py); docs/reward-server.md has the details.

Failures. A refused or dropped connection, a timeout or an HTTP 5xx may pass: each is retried
`retries` times with a short backoff, and after the last try the run stops with a checkpoint
(RewardServerUnavailable, a RewardUnavailable). An answer that can never be right (HTTP 4xx, not JSON,
no scores, a wrong count, a non-finite score) fails at once (RewardError). Every message is one
line naming the URL, the cause and the fix.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch
from torch import Tensor

from tether.config import PPOConfig, check_reward_url
from tether.rewards import RewardError, RewardUnavailable, check_scores

SCORE_KEYS = ("scores", "rewards")  # "rewards": OpenRLHF's remote reward servers
SNIPPET = 200  # characters of a bad answer quoted in a message


class RewardServerUnavailable(RewardUnavailable):
    """The reward server kept failing in a way that may pass (refused, dropped, timed out, HTTP 5xx).
    Nothing of the update reached the weights, so the run stops with a checkpoint, as after a timeout."""


class _PassingFailure(Exception):
    """One try that failed in a way worth retrying; `cause` and `fix` finish the message of the last one."""

    def __init__(self, cause: str, fix: str):
        super().__init__(cause)
        self.cause, self.fix = cause, fix


class HttpReward:
    """Scores from a reward server speaking the protocol above, using only the standard library."""

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 2, batch_size: int = 64,
                 concurrency: int = 4, name: Optional[str] = None, backoff_s: float = 0.5):
        check_reward_url(url)
        self.url = url
        self.name = name or url
        self.timeout_s = timeout_s
        self.retries = retries
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.backoff_s = backoff_s  # before retry k (from 0): backoff_s * 2**k seconds

    def score(self, prompts: list[str], responses: list[str], input_ids=None, attention_mask=None,
              columns: Optional[dict[str, list]] = None) -> Tensor:
        """(B,) float32 scores, in the order of `responses`."""
        starts = range(0, len(responses), self.batch_size)
        bodies = [self._request_body(prompts, responses, columns, slice(s, s + self.batch_size)) for s in starts]
        if not bodies:
            return torch.zeros(0, dtype=torch.float32)
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(bodies)), thread_name_prefix="reward_url")
        try:
            futures = [pool.submit(self._score_batch, body, responses[s : s + self.batch_size])
                       for body, s in zip(bodies, starts)]
            scores = torch.cat([future.result() for future in futures])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # the first failure stops batches not yet sent
        self._check_finite(scores, responses)
        return scores

    def check_reachable(self) -> None:
        """One TCP connection to the server, before any model loads: a server that is not running is
        named now, not after minutes of loading."""
        parts = urllib.parse.urlsplit(self.url)
        try:
            socket.create_connection((parts.hostname, self.port), timeout=self.timeout_s).close()
        except ConnectionRefusedError:
            raise RewardError(self._message("refused the connection", self._start_server_fix(), tries=1)) from None
        except OSError as err:
            raise RewardError(self._message(f"cannot be reached ({err})", "check the host and port in reward_url, "
                                            "and that the server is running", tries=1)) from err

    @property
    def port(self) -> int:
        parts = urllib.parse.urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    # --- one batch --------------------------------------------------------------------------

    def _request_body(self, prompts: list[str], responses: list[str], columns: Optional[dict[str, list]],
                      rows: slice) -> bytes:
        payload = {"prompts": list(prompts[rows]), "responses": list(responses[rows]),
                   "columns": {name: list(values[rows]) for name, values in (columns or {}).items()}}
        try:
            return json.dumps(payload).encode("utf-8")
        except (TypeError, ValueError) as err:  # a record field holding something JSON cannot carry
            raise RewardError(f"reward_url {self.url}: the prompt records cannot be sent as JSON ({err}); keep "
                              "record fields to strings, numbers, lists and mappings") from err

    def _score_batch(self, body: bytes, responses: list[str]) -> Tensor:
        """One batch's scores, retrying failures that may pass."""
        tries = self.retries + 1
        for attempt in range(tries):
            try:
                answer = self._post(body)
                break
            except _PassingFailure as failure:
                if attempt == tries - 1:
                    raise RewardServerUnavailable(self._message(failure.cause, failure.fix, tries)) from None
                time.sleep(self.backoff_s * 2 ** attempt)
        return self._scores_from(answer, responses)

    def _post(self, body: bytes) -> bytes:
        """The answer's body; a failure worth retrying raises _PassingFailure, one that is not RewardError."""
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as err:  # before URLError, its base class
            raise self._http_status_failure(err.code, _read_quietly(err)) from None
        except urllib.error.URLError as err:  # failed to connect: the reason says why
            raise self._connection_failure(err.reason) from None
        except (OSError, http.client.HTTPException) as err:  # timed out or dropped while answering
            raise self._connection_failure(err) from None

    def _http_status_failure(self, code: int, body: str) -> Exception:
        """A 5xx may pass (a server restarting, overloaded); a 4xx says these requests will never do."""
        quoted = repr(body[:SNIPPET])
        if code >= 500:
            return _PassingFailure(f"answered HTTP {code}: {quoted}", "see the server's log for the error "
                                   "(reward_url_retries sets how often a 5xx is retried)")
        return RewardError(self._message(f"answered HTTP {code}: {quoted}", "the server refuses these requests: "
                                        "check that reward_url is its scoring endpoint and that it speaks the "
                                        "protocol in docs/reward-server.md", tries=1))

    def _connection_failure(self, reason) -> _PassingFailure:
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return _PassingFailure(f"did not answer within reward_url_timeout_s={self.timeout_s:g} s",
                                   "raise reward_url_timeout_s, lower reward_url_batch_size, or check that the "
                                   "server is not stuck or overloaded")
        if isinstance(reason, ConnectionRefusedError):
            return _PassingFailure("refused the connection", self._start_server_fix())
        if isinstance(reason, (ConnectionError, http.client.HTTPException)):
            return _PassingFailure(f"dropped the connection ({type(reason).__name__}: {reason})",
                                   "see the server's log: it may have crashed or restarted")
        return _PassingFailure(f"cannot be reached ({reason})", "check the host and port in reward_url, and that "
                               "the server is running")

    def _scores_from(self, answer: bytes, responses: list[str]) -> Tensor:
        text = answer.decode("utf-8", errors="replace")
        try:
            data = json.loads(text)
        except ValueError:
            raise RewardError(self._message(f"answered with malformed JSON: {text[:SNIPPET]!r}",
                                            self._answer_fix(), tries=1)) from None
        key = next((k for k in SCORE_KEYS if isinstance(data, dict) and k in data), None)
        if key is None:
            raise RewardError(self._message(f"answered without a \"scores\" key: {text[:SNIPPET]!r}",
                                            self._answer_fix(), tries=1))
        try:
            return check_scores(data[key], responses, f"server {self.url}")
        except RewardError as err:  # a wrong count, or not a list of numbers
            raise RewardError(f"{err}; {self._answer_fix()}") from None

    def _check_finite(self, scores: Tensor, responses: Sequence[str]) -> None:
        """As for a reward model in-process: a NaN or inf names the response and stops the run."""
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise RewardError(f"reward server {self.url} returned a non-finite score ({scores[i].item()}) for "
                              f"response {i}: {responses[i][:SNIPPET]!r}; fix the reward model (or the server) for "
                              "that input")

    # --- messages -----------------------------------------------------------------------------

    def _message(self, cause: str, fix: str, tries: int) -> str:
        after = f" (after {tries} tries)" if tries > 1 else ""
        return f"reward server {self.url} {cause}{after}; {fix}"

    def _start_server_fix(self) -> str:
        return f"is the server running? start it with `tether serve-reward RUN_DIR/final --port {self.port}`"

    @staticmethod
    def _answer_fix() -> str:
        return ('the server must answer {"scores": [one number per response, in order]} '
                "(protocol in docs/reward-server.md)")


def _read_quietly(err: urllib.error.HTTPError) -> str:
    """The body of an error answer, or '' when it cannot be read."""
    try:
        return err.read().decode("utf-8", errors="replace")
    except (OSError, http.client.HTTPException):
        return ""


def http_reward_from_config(cfg: PPOConfig) -> HttpReward:
    """The reward_url source of a PPO run, checked to be reachable before any model loads."""
    reward = HttpReward(cfg.reward_url, timeout_s=cfg.reward_url_timeout_s, retries=cfg.reward_url_retries,
                        batch_size=cfg.reward_url_batch_size, concurrency=cfg.reward_url_concurrency)
    reward.check_reachable()
    return reward
