"""LoRA adapters through `peft`: per-architecture defaults, clear errors, peft-format saving, merged export.

peft is imported lazily (DESIGN §2): full fine-tuning never needs it.
An adapter directory written here is plain peft format (`adapter_config.json` +
`adapter_model.safetensors`), so `PeftModel.from_pretrained(base, dir)` — or plain
`AutoModelForCausalLM.from_pretrained(dir)` with peft installed — loads it; `export_merged`
writes a full model that plain transformers loads without peft.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from tether.config import LoraSettings
from tether.models import decoder_layers, init_score_head, layer_list_name, load_causal_lm

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"

# The linear layers of attention and MLP, per architecture (what peft and TRL users target).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


class LoraError(ValueError):
    """A LoRA setting that cannot work with this model; the message says what would."""


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the layers LoRA can wrap (Linear, GPT-2's Conv1D), for error messages."""
    names = set()
    for full_name, module in model.named_modules():
        if ".lora_" in full_name or full_name.endswith("base_layer"):
            continue  # the inside of a layer LoRA already wraps
        wrapped = hasattr(module, "base_layer")
        if wrapped or isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_targets(model: nn.Module, requested: list[str]) -> list[str]:
    """The requested target modules, or the architecture's default; error if any matches nothing."""
    model_type = getattr(model.config, "model_type", "")
    targets = list(requested) or DEFAULT_TARGETS.get(model_type)
    available = linear_module_names(model)
    if not targets:
        raise LoraError(f"no default LoRA target modules for model type {model_type!r}; set lora_target_modules "
                        f"to some of this model's linear layers: {', '.join(available)}")
    missing = [t for t in targets if t not in available]
    if missing:
        raise LoraError(f"lora_target_modules {missing} match no layer of this {model_type} model; its linear "
                        f"layers are: {', '.join(available)}")
    return targets


def lora_config(model: nn.Module, settings: LoraSettings, inference: bool = False):
    from peft import LoraConfig

    layers = len(decoder_layers(model))
    extra = {}
    if settings.top_layers:
        if settings.top_layers > layers:
            raise LoraError(f"lora_layers={settings.top_layers} but the model has {layers} transformer blocks")
        extra = {"layers_to_transform": list(range(layers - settings.top_layers, layers)),
                 "layers_pattern": layer_list_name(model)}
    # GPT-2's Conv1D stores its weight transposed (fan_in_fan_out in peft's terms).
    transposed = any(type(m).__name__ == "Conv1D" for m in model.modules())
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=resolve_targets(model, settings.target_modules), bias="none",
                      inference_mode=inference, fan_in_fan_out=transposed, **extra)


def add_lora(model: nn.Module, settings: LoraSettings, adapter: str = "default"):
    """Wrap `model` in a PeftModel with one trainable adapter; base weights frozen. B = 0, so the
    wrapped model computes exactly what the base does until it trains (Hu et al. 2021 §4.1)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, settings), adapter_name=adapter)


def is_adapter_dir(path) -> bool:
    return path is not None and (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_path(path) -> str:
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def adapter_layers(peft_model, adapter: str) -> Optional[list[int]]:
    """Block indices an adapter touches, or None when it touches every block."""
    layers = peft_model.peft_config[adapter].layers_to_transform
    return [layers] if isinstance(layers, int) else (list(layers) if layers is not None else None)


def save_adapter(peft_model, adapter: str, path, state_dict: Optional[dict] = None) -> None:
    """One adapter in peft format directly in `path` (peft puts non-default adapters in a subfolder).
    `state_dict`: the weights to write instead of the model's own (gathered from FSDP2 shards)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    extra = {"state_dict": state_dict} if state_dict is not None else {}
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter], **extra)
        source = Path(tmp) / adapter if adapter != "default" else Path(tmp)
        for file in source.iterdir():
            if file.is_file():
                shutil.move(str(file), path / file.name)


def load_merged_causal_lm(path: str, dtype: torch.dtype = torch.float32):
    """A causal LM from a full model directory, or from an adapter directory merged into its base."""
    if not is_adapter_dir(path):
        return load_causal_lm(path, dtype)
    from peft import PeftModel

    base = load_causal_lm(adapter_base_path(path), dtype)
    return PeftModel.from_pretrained(base, path).merge_and_unload()


def export_merged(adapter_dir: str, output_dir: str, overwrite: bool = False) -> Path:
    """Merge a policy adapter into its base and save a model plain transformers loads (no peft).
    Written to a temporary directory and renamed into place: a directory that holds anything is
    replaced only with `overwrite`, and never the adapter's own directory or one around it."""
    import shutil

    from transformers import AutoTokenizer

    if not is_adapter_dir(adapter_dir):
        raise LoraError(f"{adapter_dir} holds no LoRA adapter ({ADAPTER_CONFIG} missing); a full model needs no export")
    out, source = Path(output_dir), Path(adapter_dir).resolve()
    check_export_target(out, source, overwrite)
    model = load_merged_causal_lm(adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    partial = out.with_name(out.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    if out.exists():  # only with overwrite (checked above), and only once the new model is complete
        shutil.rmtree(out)
    partial.rename(out)
    log.info("merged %s into its base and saved it to %s", adapter_dir, out)
    return out


def check_export_target(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse an export that would write into something it did not create."""
    target = out.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise LoraError(f"export target {out} is the adapter directory {source} or around it; choose a new directory")
    if out.is_file():
        raise LoraError(f"export target {out} is a file; choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise LoraError(f"export target {out} already holds files (e.g. a run's final/ or another model); "
                            "choose a new directory, or pass --overwrite to replace it")


def add_adapter(peft_model, adapter: str, settings: LoraSettings) -> None:
    """A second (third, ...) adapter on the same base, trainable, B = 0."""
    peft_model.add_adapter(adapter, lora_config(peft_model.get_base_model(), settings))


def load_adapter_weights(peft_model, adapter: str, path) -> None:
    """Load the weights of a peft-format directory into the existing adapter `adapter`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(path) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, weights, adapter_name=adapter)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise LoraError(f"adapter in {path} does not fit adapter {adapter!r} of this model "
                        f"(e.g. {unexpected[0]}); was it trained on another base or with other LoRA settings?")


def add_adapter_from_dir(peft_model, adapter: str, path, trainable: bool) -> None:
    """A new adapter `adapter` with the config and weights of the peft-format directory `path`."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(path))
    config.inference_mode = not trainable
    config.modules_to_save = None
    peft_model.add_adapter(adapter, config)
    load_adapter_weights(peft_model, adapter, path)


# --- a LoRA reward model: the base's backbone + adapter "reward" + a scalar head ----------

SCORE_HEAD_FILE = "score_head.safetensors"


class LoraRewardModel(nn.Module):
    """A causal LM's backbone with the LoRA adapter "reward" and a one-output score head with a bias.

    It quacks like a decoder AutoModelForSequenceClassification where tether reads one
    (`base_model` is the backbone, `score` the head), so reward training, normalisation and
    PPO scoring use it unchanged. The head has a bias, so score normalisation needs no
    final-norm trick. Saved as a peft adapter plus `score_head.safetensors`; PPO with
    placement=shared_base loads it as the third adapter on the policy's base.
    """

    def __init__(self, peft_model, score: nn.Linear):
        super().__init__()
        self.peft = peft_model
        self.score = score

    @property
    def base_model(self) -> nn.Module:
        return self.peft.get_base_model().base_model

    @property
    def config(self):
        return self.peft.get_base_model().config

    def save_pretrained(self, path, **_kwargs) -> None:
        from safetensors.torch import save_file

        save_adapter(self.peft, "reward", path)
        head = {k: v.detach().contiguous().cpu() for k, v in self.score.state_dict().items()}
        save_file(head, str(Path(path) / SCORE_HEAD_FILE))


def is_lora_reward_dir(path) -> bool:
    return is_adapter_dir(path) and (Path(path) / SCORE_HEAD_FILE).is_file()


def require_full_model(path: str, what: str) -> None:
    """An adapter's own base must be on disk: a stack of adapters would save a base path that is wrong."""
    if is_adapter_dir(path):
        raise LoraError(f"{what}={path} is a LoRA adapter; merge it into a full model first "
                        f"(`tether export {path} {path}-merged`) and point {what} at that directory")


def build_lora_reward_model(base, settings: LoraSettings, head_dtype: Optional[torch.dtype] = None) -> LoraRewardModel:
    """A fresh reward adapter (B = 0) and head N(0, 1/sqrt(d+1)), bias 0 (N-details item 6) on `base`;
    the head in `head_dtype` (the trainable dtype: fp32 over a bf16 base under bf16-mixed)."""
    peft_model = add_lora(base, settings, adapter="reward")
    head = nn.Linear(base.config.get_text_config().hidden_size, 1).to(head_dtype or base.dtype)
    init_score_head(head)
    # The Bradley-Terry loss sees only score differences: the bias's gradient is exactly 0, and
    # Adam would turn its rounding noise into steps. Normalisation sets it after training.
    head.bias.requires_grad_(False)
    return LoraRewardModel(peft_model, head)


def load_score_head(path, hidden: int, dtype: torch.dtype) -> nn.Linear:
    from safetensors.torch import load_file

    head = nn.Linear(hidden, 1).to(dtype)
    head.load_state_dict(load_file(str(Path(path) / SCORE_HEAD_FILE)))
    return head


def load_lora_reward_model(path: str, dtype: torch.dtype = torch.float32) -> LoraRewardModel:
    """A LoRA reward model written by `tether reward lora_rank=...`, on its base from disk."""
    from peft import PeftModel

    base = load_causal_lm(adapter_base_path(path), dtype)
    peft_model = PeftModel.from_pretrained(base, path, adapter_name="reward")
    hidden = base.config.get_text_config().hidden_size
    return LoraRewardModel(peft_model, load_score_head(path, hidden, dtype))


def same_base(path_a: str, path_b: str) -> bool:
    """Whether two model directories hold the same base: the same path, or the same config and weight files."""
    a, b = Path(path_a), Path(path_b)
    if a.resolve() == b.resolve():
        return True
    if not (a.is_dir() and b.is_dir()):
        return str(path_a) == str(path_b)

    def fingerprint(d: Path):
        config = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
        config.pop("_name_or_path", None)
        files = sorted((f.name, f.stat().st_size) for f in d.glob("*.safetensors"))
        return config, files

    return fingerprint(a) == fingerprint(b)
