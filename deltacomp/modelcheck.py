"""A model folder's config.json against its weights, before transformers builds the model from them.

transformers builds the model the config describes and then copies the checkpoint in: a tensor whose shape
the config gets wrong fails only after every parameter was allocated (a vocab_size of 33554432 is gigabytes),
and a parameter the weights lack (num_hidden_layers above the layers saved, ``tie_word_embeddings: false``
without an ``lm_head``) is initialised at random, so the model runs and scores a partly random network.
``check_folder`` builds the described model on the meta device (no memory), maps every checkpoint tensor name
to the parameter it loads into (transformers' own renaming rules; merged experts count as present) and refuses
a missing parameter, a shape mismatch, or layers the config leaves out, in one CheckpointError line.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from .checkpoint import hf_folder, open_checkpoint
from .errors import CheckpointError

_MEMO: dict[tuple, Any] = {}
_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _stat_key(folder: Path, files: list[Path]) -> tuple:
    return tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in [folder / "config.json", *files])


def check_folder(path: str | os.PathLike):
    """The transformers config of model folder ``path`` once its weights are known to fill exactly the model it
    describes (memoized by file sizes and times); None for a path that is not a folder with a config.json (the
    loader's own error says what is wrong there). Raises CheckpointError naming the file and the mismatch."""
    folder = Path(path)
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        return None
    with open_checkpoint(folder) as ck:
        key = _stat_key(folder, ck.files())
        if key not in _MEMO:
            shapes = {n: tuple(ck.shape(n)) for n in ck.names()}
            _MEMO[key] = _check(folder, shapes)
    return _MEMO[key]


def check_token_ids(low: int, high: int, config, folder, source: str) -> None:
    """Token ids ``low..high`` (from ``source``: a tokenizer, or ids given) are rows of the embedding of the model
    in ``folder`` (its config's vocab_size, which check_folder holds to the weights); else an IndexError inside
    the model's forward pass. Raises CheckpointError naming both."""
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        return
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise CheckpointError(f"{source}: token id {bad} is outside the vocab_size {vocab} of "
                              f"{Path(folder) / 'config.json'}; the tokenizer and the model do not match")


def _load_config(folder: Path):
    from transformers import AutoConfig

    with hf_folder(folder, "config"):
        try:
            return AutoConfig.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError, TypeError):
            raise  # hf_folder words these
        except Exception as exc:  # noqa: BLE001 - config validators raise their own types (huggingface_hub's)
            raise CheckpointError(f"{folder / 'config.json'}: transformers refuses it ({_first_line(exc)})") from None


def _meta_model(folder: Path, config, n_tensors: int):
    """The model ``config`` describes, built on the meta device (no parameter memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > n_tensors:  # each layer holds tensors: refuse before building them
        raise CheckpointError(f"{folder / 'config.json'}: num_hidden_layers={layers}, but the weights hold only "
                              f"{n_tensors} tensors; the config does not describe these weights")
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - whatever the config's values make the model's __init__ raise
        raise CheckpointError(f"{folder / 'config.json'}: transformers cannot build the model it describes "
                              f"({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc  # huggingface_hub's validation error wraps the validator's own
    return f"{type(cause).__name__}: " + " ".join(str(cause).split())[:200]


def _check(folder: Path, shapes: dict[str, tuple[int, ...]]):
    config = _load_config(folder)
    if getattr(config, "quantization_config", None):  # weights stored quantized: names and shapes are the
        _check_prequantized(folder, config.quantization_config, shapes)  # quantizer's business
        return config
    model = _meta_model(folder, config, len(shapes))
    want = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    loaded, converted = _loaded_names(model, list(shapes), want)
    for name, key in loaded.items():
        if key in want and want[key] != shapes[name] and key not in converted:
            raise CheckpointError(_shape_message(folder, config, key, want[key], name, shapes[name]))
    _check_missing(folder, config, model, set(loaded.values()) | converted, shapes)
    _check_unused(folder, config, model, loaded, want)
    return config


# bitsandbytes' serialized layers: an 8-bit weight keeps its scales in <layer>.SCB, a 4-bit one in <weight>.absmax
_BNB_MARKERS = {"load_in_8bit": ".SCB", "load_in_4bit": ".absmax"}


def _check_prequantized(folder: Path, quant, shapes: dict) -> None:
    """A config.json saying its weights are bitsandbytes-quantized over weights that are not (no tensor holds
    the quantizer's scales): transformers loads them as they are and the first forward pass fails inside
    bitsandbytes (``'Parameter' object has no attribute 'CB'``)."""
    quant = quant if isinstance(quant, dict) else getattr(quant, "to_dict", lambda: {})()
    if quant.get("quant_method") != "bitsandbytes":
        return
    for flag, marker in _BNB_MARKERS.items():
        if quant.get(flag) is True and not any(n.endswith(marker) for n in shapes):
            raise CheckpointError(f"{folder / 'config.json'}: quantization_config says bitsandbytes {flag}, but no "
                                  f"tensor of the weights holds its scales (*{marker}): they are not quantized; "
                                  "remove quantization_config from config.json")


def _transforms(model) -> tuple[list, list]:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        rules = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - a transformers without these rules (4.x) or a model it cannot map
        return [], []
    return ([r for r in rules if isinstance(r, WeightRenaming)], [r for r in rules if isinstance(r, WeightConverter)])


def _loaded_names(model, names: list[str], want: dict) -> tuple[dict[str, str], set[str]]:
    """({checkpoint name: the model key it loads into}, model keys filled by converted (merged) tensors)."""
    renamings, converters = _transforms(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    loaded, converted = {}, set()
    for name in names:
        key = name
        for r in renamings:
            key, _ = r.rename_source_key(key)
        targets, merged = [key], False
        for c in converters:
            new, pattern = c.rename_source_key(key)
            if pattern is not None:
                targets = [new.replace(c.target_patterns[0], t) for t in c.target_patterns]
                merged = True
                break
        targets = [_with_prefix(t, prefix, want) for t in targets]
        if merged:
            converted.update(targets)
        loaded[name] = targets[0]
    return loaded, converted


def _with_prefix(key: str, prefix: str, want: dict) -> str:
    """transformers adds or strips the base model's prefix (``model.``) where that names a parameter."""
    if not prefix or key in want:
        return key
    if key.startswith(prefix + ".") and key[len(prefix) + 1:] in want:
        return key[len(prefix) + 1:]
    return f"{prefix}.{key}" if f"{prefix}.{key}" in want else key


def _ignored(model, attr: str, key: str) -> bool:
    return any(re.search(p, key) for p in (getattr(model, attr, None) or ()))


def _check_missing(folder: Path, config, model, present: set[str], shapes: dict) -> None:
    """A parameter no checkpoint tensor fills (transformers would initialise it at random)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    missing = []
    for names in groups.values():
        if any(n in present or tied.get(n) in present for n in names):
            continue
        if not any(_ignored(model, "_keys_to_ignore_on_load_missing", n) for n in names):
            missing.append(names[0])
    if not missing:
        return
    cfg, name = folder / "config.json", missing[0]
    layers = getattr(config, "num_hidden_layers", None)
    m = re.search(r"^(.*?\.)(\d+)\.", name)
    if m and isinstance(layers, int) and int(m.group(2)) < layers:
        have = {int(x.group(1)) for n in shapes for x in [re.match(re.escape(m.group(1)) + r"(\d+)\.", n)] if x}
        if int(m.group(2)) not in have:
            raise CheckpointError(f"{cfg}: num_hidden_layers={layers} names {m.group(0)}* but the weights hold no "
                                  f"such tensors (they hold {len(have)} layers); the config does not describe them")
    hint = ""
    if getattr(config, "tie_word_embeddings", None) is False and _is_output_head(model, name):
        hint = "; tie_word_embeddings is false, so the output head needs its own weights (true shares the embeddings)"
    raise CheckpointError(f"{cfg}: the model it describes has {len(missing)} parameter(s) the weights do not hold, "
                          f"e.g. {name} (transformers would initialise them at random){hint}")


def _is_output_head(model, name: str) -> bool:
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return head is not None and any(p is head.weight for n, p in model.named_parameters() if n == name)


def _check_unused(folder: Path, config, model, loaded: dict[str, str], want: dict) -> None:
    """A checkpoint tensor of a kind the model holds (``model.layers.N.x``) under an index it lacks: the config
    describes fewer layers (or experts) than the weights hold, and transformers would drop the rest."""
    kinds = {_INDEX.sub(".N", n) for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, key in loaded.items():
        if key in want or _ignored(model, "_keys_to_ignore_on_load_unexpected", key):
            continue
        if _INDEX.sub(".N", key) in kinds or _in_empty_list(model, key):
            layers = getattr(config, "num_hidden_layers", None)
            said = f"num_hidden_layers={layers}" if isinstance(layers, int) else "it"
            raise CheckpointError(f"{folder / 'config.json'}: {said} leaves out {name}, which the weights hold; "
                                  "the config describes a smaller model than the weights")


def _in_empty_list(model, key: str) -> bool:
    """``key`` (``model.layers.0.mlp...``) indexes a module list the model holds empty: a config of zero (or
    a negative number of) layers, whose kinds of layer parameters are then nowhere in the model."""
    from torch.nn import ModuleDict, ModuleList

    m = _INDEX.search(key)
    if m is None:
        return False
    try:
        holder = model.get_submodule(key[:m.start()])
    except AttributeError:
        return False
    return isinstance(holder, (ModuleList, ModuleDict)) and len(holder) == 0


def _shape_message(folder: Path, config, key: str, want: tuple, name: str, got: tuple) -> str:
    values = {k: v for k, v in config.to_dict().items() if isinstance(v, int) and not isinstance(v, bool)}
    named = [f"{k}={v}" for k, v in values.items() if v in want and v not in got][:3]
    said = f" ({', '.join(named)})" if named else ""
    size = f", {math.prod(want):,} elements" if math.prod(want) > 10 * max(1, math.prod(got)) else ""
    return (f"{folder / 'config.json'}: describes {key} as {list(want)}{said}{size}, but the weights hold "
            f"{name} as {list(got)}; the config does not describe these weights")
