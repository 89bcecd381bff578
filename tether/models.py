"""The four roles: policy, reference, critic (value model) and reward model.

Every role is a plain Hugging Face model (or a backbone plus a scalar head) so that a
trained policy loads with `AutoModelForCausalLM.from_pretrained` and nothing of ours.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from tether.algo import last_token_index

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
VALUE_HEAD_FILE = "value_head.safetensors"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --- tokenizer ----------------------------------------------------------------


def load_tokenizer(path: str, embedding_rows: Optional[int] = None):
    """`embedding_rows`: the model's vocabulary as saved, when an inference engine holds it (the
    pad token is then chosen inside it where one fits: `pad_token_inside_embeddings`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if embedding_rows is not None:
        pad_token_inside_embeddings(tokenizer, embedding_rows)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"  # prompts are left-padded for generation (N-details item 1)
    return tokenizer


def ensure_pad_token(tokenizer) -> bool:
    """Give the tokenizer a dedicated pad token when it has none, or when pad is EOS.

    Padding with EOS hides where responses really end (N-details item 1). Returns True
    when a token was added: models must then be resized with `resize_for_tokenizer`.
    """
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    unk = tokenizer.unk_token_id
    if unk is not None and unk != tokenizer.eos_token_id and unk != tokenizer.bos_token_id:
        # An existing spare special token keeps the embedding matrix (and a shared LoRA base) as saved.
        tokenizer.pad_token = tokenizer.unk_token
        log.info("tokenizer had no dedicated pad token; padding with its unk token %r", tokenizer.unk_token)
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    log.warning("tokenizer had no dedicated pad token; added %r (id %d)", PAD_TOKEN, tokenizer.pad_token_id)
    return True


def pad_token_inside_embeddings(tokenizer, rows: int) -> bool:
    """Pad without growing the model when an inference engine holds it: the engine's vocabulary is
    the model's `rows` as saved, so a pad row added here would exist in the trainer's model only.

    Without a dedicated pad token (or a spare unk, which `ensure_pad_token` takes), pad with a spare
    special token the vocabulary already has (one named pad or reserved, e.g. Llama 3's), else add
    one in a row the model has beyond its tokenizer (vocabularies padded for speed, e.g. Qwen2).
    Returns False when there is neither (GPT-2): `ensure_pad_token` then adds a row."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    spare_unk = tokenizer.unk_token_id not in (None, eos, tokenizer.bos_token_id)
    if (pad is not None and pad != eos) or spare_unk:
        return True
    spare = spare_special_token(tokenizer, rows)
    if spare is not None:
        tokenizer.pad_token = spare
        log.info("tokenizer had no dedicated pad token; padding with its spare special token %r", spare)
        return True
    if len(tokenizer) < rows:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        log.info("tokenizer had no dedicated pad token; added %r in the model's unused row %d", PAD_TOKEN,
                 tokenizer.pad_token_id)
        return True
    return False


def spare_special_token(tokenizer, rows: int) -> Optional[str]:
    """A special token below `rows` that no role uses: one named pad first, then one named reserved.
    Chat-template tokens (<|eot_id|>, ...) are never chosen: they carry neither name."""
    roles = {getattr(tokenizer, f"{role}_token_id", None) for role in ("bos", "eos", "unk", "sep", "cls", "mask")}
    candidates = sorted((i, t.content) for i, t in tokenizer.added_tokens_decoder.items()
                        if t.special and i < rows and i not in roles)
    for word in ("pad", "reserved"):
        for _, content in candidates:
            if word in content.lower():
                return content
    return None


def resize_for_tokenizer(model: nn.Module, tokenizer) -> None:
    """Grow the embedding matrix when the tokenizer gained tokens (e.g. the pad token)."""
    embeddings = model.get_input_embeddings()
    if embeddings.num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


def same_vocabulary(a, b) -> bool:
    """Same token ids, up to the pad token one of the two tokenizers may have gained."""
    va, vb = a.get_vocab(), b.get_vocab()
    small, large = (va, vb) if len(va) <= len(vb) else (vb, va)
    return len(large) - len(small) <= 1 and all(large.get(k) == v for k, v in small.items())


def has_tokenizer_files(path: str) -> bool:
    """Whether a model path carries its own tokenizer (a hub id is assumed to)."""
    p = Path(path)
    if not p.is_dir():
        return True
    return any((p / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def eos_token_ids(tokenizer, model: Optional[nn.Module] = None) -> list[int]:
    """All ids that end a response: the tokenizer's EOS plus the model's generation EOS list."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    if tokenizer.pad_token_id != tokenizer.eos_token_id:  # a dedicated pad never ends a response;
        ids.discard(tokenizer.pad_token_id)               # padding with EOS (a reward model's own tokenizer) keeps it
    if not ids:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token so responses can end")
    return sorted(ids)


def position_limit(path: str) -> Optional[int]:
    """The longest sequence a model can embed, read from its config alone (no weights): learned
    absolute positions (GPT-2's n_positions, max_position_embeddings without rotary embeddings)
    end in an IndexError past it. Rotary models only degrade, so they have none here."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path).get_text_config()
    values = config.to_dict()
    if values.get("n_positions"):
        return int(values["n_positions"])
    rotary = any("rope" in key for key in values) or values.get("position_embedding_type") == "rotary"
    if values.get("max_position_embeddings") and not rotary:
        return int(values["max_position_embeddings"])
    return None


def check_sequence_fits(path: str, length: int, what: str, fix: str) -> None:
    """Refuse, before any weights load, a sequence longer than the model's positions."""
    limit = position_limit(path)
    if limit is not None and length > limit:
        raise ValueError(f"{what} = {length} tokens is longer than {path} can embed ({limit} positions); {fix}")


# --- policy and reference -----------------------------------------------------


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return use_fused_kernels(AutoModelForCausalLM.from_pretrained(path, dtype=dtype))


def use_fused_kernels(model: nn.Module) -> nn.Module:
    """Activations written as chains of elementwise ops become one kernel computing the same function.

    GPT-2's gelu_new is seven passes over the (tokens, 4 x hidden) activation forward, more backward;
    torch's gelu(approximate="tanh") is one (equal to float rounding, ~1e-7). On CPU those passes
    were a fifth of a 10.8M-parameter GPT-2's training time (benchmarks/ppo_speed.py). Only the
    modules change: the config still says gelu_new, so a saved model loads as before anywhere."""
    from transformers.activations import GELUTanh, NewGELUActivation

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
    return model


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in every RL role (N-details item 4): otherwise the first ratio is not 1."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout", "dropout"):
        if hasattr(model.config, key) and isinstance(getattr(model.config, key), float):
            setattr(model.config, key, 0.0)


def frozen_copy(model: nn.Module) -> nn.Module:
    """The reference: a frozen copy of the initial policy."""
    reference = copy.deepcopy(model)
    return freeze(reference)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def cache_keyword(model: nn.Module) -> str:
    """transformers 5 renamed `past_key_values` to `cache`; support both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding: cumsum(mask) - 1, clamped at 0 (N-details item 2)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# --- architecture helpers ----------------------------------------------------------

LAYER_LISTS = ("layers", "h", "blocks")  # where the transformer blocks live: Llama/Qwen/Mistral, GPT-2, others


class ArchitectureError(ValueError):
    """A model whose layout tether cannot find its way around; the message says what it looked for."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM, sequence-classification model or bare backbone."""
    for module in model.modules():
        for name in LAYER_LISTS:
            layers = getattr(module, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    raise ArchitectureError(f"cannot find the transformer blocks of {type(model).__name__} (looked for {LAYER_LISTS})")


def layer_list_name(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for module in model.modules():
        for name in LAYER_LISTS:
            if getattr(module, name, None) is layers:
                return name
    raise AssertionError("unreachable")


def init_score_head(head: nn.Linear, generator: Optional[torch.Generator] = None) -> None:
    """Weights ~ N(0, 1/sqrt(d_model + 1)), bias 0 (N-details item 6; lm-human-preferences).

    With unit-scale features the initial scores then have std about 1, so the first
    Bradley-Terry gradients are neither vanishing nor saturated.
    """
    d_model = head.weight.shape[1]
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(d_model + 1), generator=generator)
        if head.bias is not None:
            head.bias.zero_()


# --- frozen lower blocks, computed once for every role ----------------------------


@contextmanager
def capture_block_input(model: nn.Module, index: int):
    """Yields a dict whose "hidden" becomes the (B, L, H) input of transformer block `index`
    during the next forward pass of `model`."""
    captured: dict = {}

    def hook(_module, args, kwargs):
        captured["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = decoder_layers(model)[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised inside a forward pass once the trunk is captured: the blocks above are not needed."""


@torch.no_grad()
def lower_blocks_output(backbone: nn.Module, index: int, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, L, H) input of transformer block `index` of `backbone` (a bare transformer, e.g. a causal
    LM's `.base_model`): the blocks below it are run, the ones from `index` on are not."""
    def stop(_module, _args, _kwargs):
        raise _StopForward

    with capture_block_input(backbone, index) as captured:
        handle = decoder_layers(backbone)[index].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            last_hidden_state(backbone, input_ids, attention_mask)
        except _StopForward:
            pass
        finally:
            handle.remove()
    return captured["hidden"]


@contextmanager
def start_at_block(model: nn.Module, index: int, hidden: Tensor):
    """Run only blocks `index`.. of `model`, fed `hidden` (B, L, H) as their input: blocks below
    `index` are skipped. Embeddings, positions and the attention mask are still built as usual."""
    layers = decoder_layers(model)
    name = layer_list_name(model)
    owner = next(m for m in model.modules() if getattr(m, name, None) is layers)

    def hook(_module, args, kwargs):
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = layers[index].register_forward_pre_hook(hook, with_kwargs=True)
    setattr(owner, name, nn.ModuleList(list(layers)[index:]))
    try:
        yield
    finally:
        setattr(owner, name, layers)
        handle.remove()


# --- critic -------------------------------------------------------------------


class ValueModel(nn.Module):
    """A transformer backbone plus a scalar value head: V(s_t) for every position."""

    def __init__(self, backbone: nn.Module, head: Optional[nn.Linear] = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.get_text_config().hidden_size
        self.value_head = head if head is not None else nn.Linear(hidden, 1)
        if head is None:  # zero init: the first values are 0, not noise (N-details item 6)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) values, float32."""
        hidden = last_hidden_state(self.backbone, input_ids, attention_mask)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def save_pretrained(self, path: str | Path, state_dict: Optional[dict[str, Tensor]] = None) -> None:
        """Backbone in transformers format, value head beside it. `state_dict`: this module's
        weights to write instead of its own (whole tensors gathered from FSDP2 shards)."""
        from safetensors.torch import save_file

        path = Path(path)
        own = state_dict if state_dict is not None else self.state_dict()
        backbone = {k[len("backbone."):]: v for k, v in own.items() if k.startswith("backbone.")}
        self.backbone.save_pretrained(path, state_dict=backbone if state_dict is not None else None)
        head = {k[len("value_head."):]: v.detach().contiguous().cpu() for k, v in own.items()
                if k.startswith("value_head.")}
        save_file(head, str(path / VALUE_HEAD_FILE))

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable()


def last_hidden_state(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    out = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def load_backbone(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModel

    return use_fused_kernels(AutoModel.from_pretrained(path, dtype=dtype))


def load_value_model(path: str, dtype: torch.dtype = torch.float32, head_from_reward: bool = False) -> ValueModel:
    """Critic from a policy, a reward model, or a saved critic (with value_head.safetensors).

    Initialising from the reward model copies its score head too (N+ details; InstructGPT).
    A LoRA reward model's critic is built in tether/placement.py.
    """
    head_file = Path(path) / VALUE_HEAD_FILE
    if head_from_reward and not head_file.is_file():
        # One load gives backbone and score head; loading the backbone alone would report the head as unused.
        reward_model = load_reward_model(path, dtype)
        critic = ValueModel(reward_model.base_model)
        score = score_head(reward_model)
        if score is not None and score.weight.shape[0] == 1:
            critic.value_head.weight.data.copy_(score.weight.data)
            if score.bias is not None:
                critic.value_head.bias.data.copy_(score.bias.data)
        return critic.to(dtype)
    critic = ValueModel(load_backbone(path, dtype))
    if head_file.is_file():
        from safetensors.torch import load_file

        critic.value_head.load_state_dict(load_file(str(head_file)))
    return critic.to(dtype)


# --- reward model -------------------------------------------------------------


def load_reward_model(path: str, dtype: torch.dtype = torch.float32):
    """A full reward model: AutoModelForSequenceClassification with one label (a LoRA reward
    model, or either kind: `tether.placement.load_reward_model`)."""
    from transformers import AutoModelForSequenceClassification

    model = use_fused_kernels(AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype))
    if model.config.num_labels != 1:
        raise ValueError(
            f"reward model {path} has num_labels={model.config.num_labels}; a reward model must output one score "
            "(train it with `tether reward`, or load a model with num_labels=1)"
        )
    return model


def score_head(model: nn.Module) -> Optional[nn.Linear]:
    """The scalar head of a decoder AutoModelForSequenceClassification (``model.score``), if any."""
    head = getattr(model, "score", None)
    return head if isinstance(head, nn.Linear) else None


def reward_model_forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B,) scores with grad, read at the last real token (N-details item 5), whatever the padding side.

    Decoder reward models are run as backbone + score head so that padding never depends on
    `config.pad_token_id`; other architectures fall back to their own pooling. Float32, or
    float64 for a float64 model. Reward training and PPO scoring both use this one function.
    """
    head = score_head(model)
    if head is None:
        return _at_least_float32(model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0])
    hidden = last_hidden_state(model.base_model, input_ids, attention_mask)  # (B, L, H)
    last = last_token_index(attention_mask)  # (B,)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return _at_least_float32(head(pooled.to(head.weight.dtype)).squeeze(-1))


def _at_least_float32(scores: Tensor) -> Tensor:
    # bf16/fp16 scores are upcast for the loss; a float64 model keeps its precision.
    return scores if scores.dtype == torch.float64 else scores.float()


@torch.no_grad()
def reward_model_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B,) float32 scores without grad: how PPO reads the reward model."""
    return reward_model_forward(model, input_ids, attention_mask).float()
