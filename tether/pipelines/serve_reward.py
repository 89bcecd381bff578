"""`tether serve-reward RUN_DIR/final`: a trained reward model behind HTTP, for runs with `reward_url=`.

It speaks the protocol of tether/http_reward.py (docs/reward-server.md): POST (any path, e.g.
/score) {"prompts": [...], "responses": [...], "columns": {...}} -> {"scores": [...]}, and
GET /health -> {"status": "ok", "model": ...}. A text is scored exactly as PPO's in-process
ModelReward scores it with the reward model's own tokenizer: prompt + response re-encoded, an EOS
appended where the text has none (the format `tether reward` trains on). `columns` is accepted and
unused: a reward model reads only the text.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

from tether.data import _looks_like_path
from tether.lora import adapter_base_path, is_adapter_dir
from tether.models import disable_dropout, freeze, has_tokenizer_files, pick_device
from tether.placement import load_reward_model
from tether.rewards import ModelReward, RewardError, reward_eos

log = logging.getLogger(__name__)

HEALTH_PATHS = ("/health", "/health/")


class BadRequest(ValueError):
    """A request that does not follow the protocol; answered with HTTP 400 and this message."""


def load_served_reward(path: str, device: str = "auto", batch_size: int = 16) -> ModelReward:
    """The reward model at `path` (a full model or a LoRA reward adapter), scoring texts with its own tokenizer."""
    tokenizer = served_tokenizer(path)
    model = load_reward_model(path)
    disable_dropout(model)
    return ModelReward(freeze(model.to(pick_device(device))), tokenizer, batch_size=batch_size,
                       eos=reward_eos(tokenizer))


def check_model_dir(path: str) -> None:
    """A local path that holds no model fails in one line naming it (a hub id is left to the hub)."""
    local = Path(path).expanduser()
    if not local.exists():
        if _looks_like_path(path):
            raise FileNotFoundError(f"reward model {path}: no such directory; serve-reward takes what `tether reward` "
                                    "wrote to RUN_DIR/final (or a hub id)")
    elif not any((local / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise ValueError(f"{path} holds no model (no config.json or adapter_config.json); serve-reward takes what "
                         "`tether reward` wrote to RUN_DIR/final")


def served_tokenizer(path: str):
    """The tokenizer saved with the reward model (a LoRA adapter without one: its base's)."""
    from transformers import AutoTokenizer

    source = adapter_base_path(path) if is_adapter_dir(path) and not has_tokenizer_files(path) else path
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # any id works: the attention mask decides what counts
    return tokenizer


def parse_score_request(body: bytes) -> tuple[list[str], list[str]]:
    """(prompts, responses) of a scoring request, or BadRequest naming what is wrong."""
    try:
        data = json.loads(body)
    except ValueError as err:  # also a body that is not UTF-8
        raise BadRequest(f"the body is not JSON ({err}); send {{\"prompts\": [...], \"responses\": [...]}}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object {{\"prompts\": [...], \"responses\": [...]}}, got "
                         f"{type(data).__name__}")
    for key in ("prompts", "responses"):
        if key not in data:
            raise BadRequest(f"missing key {key!r}; send {{\"prompts\": [...], \"responses\": [...]}}")
        if not isinstance(data[key], list) or not all(isinstance(text, str) for text in data[key]):
            raise BadRequest(f"{key!r} must be a list of strings")
    prompts, responses = data["prompts"], data["responses"]
    if len(prompts) != len(responses):
        raise BadRequest(f"{len(prompts)} prompts for {len(responses)} responses; send one prompt per response")
    columns = data.get("columns", {})
    if columns is not None and not isinstance(columns, dict):
        raise BadRequest(f"'columns' must be an object of field -> list of values, got {type(columns).__name__}")
    return prompts, responses


class RewardServer(ThreadingHTTPServer):
    """One reward model, many clients: requests are read in threads, the model runs one batch at a time."""

    def __init__(self, address: tuple[str, int], reward: Optional[ModelReward], model_name: str):
        super().__init__(address, RewardRequestHandler)
        self.reward = reward
        self.model_name = model_name
        self.lock = threading.Lock()  # a torch model (and the tokenizer ModelReward configures) is not thread-safe

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if not responses:
            return []
        with self.lock:
            return self.reward.score(prompts, responses, None, None).tolist()


class RewardRequestHandler(BaseHTTPRequestHandler):
    server: RewardServer

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        try:
            prompts, responses = parse_score_request(self._body())
        except BadRequest as err:
            return self._answer(400, {"error": str(err)})
        try:
            scores = self.server.score(prompts, responses)
        except RewardError as err:  # e.g. a non-finite score: the same request would fail again
            return self._answer(422, {"error": str(err)})
        except Exception as err:  # noqa: BLE001 - the server stays up; the client reports status and message
            log.exception("scoring %d responses failed", len(responses))
            return self._answer(500, {"error": f"{type(err).__name__}: {err}"})
        self._answer(200, {"scores": scores})

    def do_GET(self) -> None:  # noqa: N802
        if self.path in HEALTH_PATHS:
            return self._answer(200, {"status": "ok", "model": self.server.model_name})
        self._answer(404, {"error": "GET serves only /health; score with POST {\"prompts\": [...], "
                                    "\"responses\": [...]} (docs/reward-server.md)"})

    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest("the request has no valid Content-Length header") from None
        if length < 0:
            raise BadRequest(f"Content-Length {length} is negative")
        return self.rfile.read(length)

    def _answer(self, status: int, payload: dict[str, Any]) -> None:
        if status >= 400:
            log.warning("%s %s -> HTTP %d: %s", self.command, self.path, status, payload.get("error"))
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s " + format, self.address_string(), *args)  # one line per request only with debug logging


def build_reward_server(path: str, host: str = "127.0.0.1", port: int = 8000, batch_size: int = 16,
                        device: str = "auto") -> RewardServer:
    """The server, listening (port 0: a free port, read from `.url`) but not yet serving. The port is
    taken before the model loads: a port in use fails at once, not after a long load."""
    check_model_dir(path)
    try:
        server = RewardServer((host, port), None, model_name=str(Path(path)))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is already in use (another serve-reward?); choose another with "
                             "--port, or --port 0 for any free one") from err
        raise
    try:
        server.reward = load_served_reward(path, device, batch_size)
    except BaseException:
        server.server_close()
        raise
    return server


def serve_reward(path: str, host: str = "127.0.0.1", port: int = 8000, batch_size: int = 16,
                 device: str = "auto") -> None:
    """Serve until interrupted (Ctrl-C, or SIGTERM where the caller turns it into KeyboardInterrupt)."""
    server = build_reward_server(path, host, port, batch_size, device)
    try:
        print(f"serving reward model {path} on {server.url}", flush=True)
        server.serve_forever()
    finally:
        server.server_close()
