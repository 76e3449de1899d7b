"""The fine-tuning recipe behind the bundled pairs (deltacomp.zoo): small, CPU-only, reproducible.

Reproducible means: the same seed, the same data order (windows drawn by a seeded generator from the training
works' tokens), the same number of steps, lr schedule, batch, sequence length and thread count. Bitwise equality
across different CPUs is not promised (float reductions differ by instruction set); the recipe, the losses it
reached and the library versions are written to ``recipe.json`` beside the weights.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..errors import SettingsError
from ..progress import progress_bar

# Files of the base folder the fine-tune writes itself (weights, config) rather than copying.
_OWN_FILES = re.compile(r"^(model.*\.safetensors(\.index\.json)?|config\.json|generation_config\.json|zoo\.json)$")


def _token_stream(tok, works: dict[str, str]) -> torch.Tensor:
    """All works tokenized one by one and joined with EOS, as one 1-D int64 tensor."""
    ids: list[int] = []
    for text in works.values():
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def _windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, windows: int, seq_len: int, batch: int,
                 progress: bool = False, desc: str = "held-out loss") -> float:
    """Mean next-token loss (nats/token) over ``windows`` windows of ``seq_len`` tokens, evenly spaced."""
    starts = torch.linspace(0, len(stream) - seq_len, windows).long()
    model.eval()
    total = 0.0
    for i in progress_bar(range(0, windows, batch), desc, "batch", progress):
        x = _windows(stream, starts[i:i + batch], seq_len)
        total += model(input_ids=x, labels=x).loss.item() * len(x)
    return total / windows


def _round_to_bf16_(model) -> None:
    """Round every weight to bf16 in place, so what we evaluate is exactly what we save."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def _prepare(model, tok, recipe):
    """Set what trains; returns (the model to train, the parameters to optimise). Frozen weights come out
    bit-identical."""
    if recipe.lora_rank:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0, bias="none",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj"])
        model = get_peft_model(model, cfg)   # freezes everything but the adapters
        return model, [p for p in model.parameters() if p.requires_grad]
    frozen = re.compile(recipe.frozen)
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen.search(name))
    if recipe.added_tokens:
        if recipe.weight_decay:
            raise SettingsError(f"added_tokens needs weight_decay=0 (got {recipe.weight_decay}): decay would move "
                                f"the frozen embedding rows")
        old = model.get_input_embeddings().weight.shape[0]
        # New rows start at the mean of the old ones (transformers' mean_resizing). A gradient mask keeps the old
        # rows exact: with zero gradient and zero weight decay, AdamW's update on them is exactly zero.
        model.resize_token_embeddings(len(tok), mean_resizing=True)
        emb = model.get_input_embeddings().weight
        emb.requires_grad_(True)
        mask = torch.zeros(emb.shape[0], 1)
        mask[old:] = 1.0
        emb.register_hook(lambda g: g * mask)
    return model, [p for p in model.parameters() if p.requires_grad]


def _train(model, trainable: list, train: torch.Tensor, recipe, progress: bool) -> tuple[list[float], float, float]:
    """AdamW over ``recipe.steps`` seeded random windows of ``train``: (loss curve, wall s, CPU s)."""
    opt = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    # Linear warmup, then cosine decay to zero at the last step.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / recipe.warmup if s < recipe.warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - recipe.warmup) /
                                                                  max(1, recipe.steps - recipe.warmup))))
    gen = torch.Generator().manual_seed(recipe.seed)
    starts = torch.randint(0, len(train) - recipe.seq_len, (recipe.steps, recipe.batch), generator=gen)

    model.train()
    curve = []
    t_train, cpu_train = time.perf_counter(), time.process_time()
    bar = progress_bar(range(recipe.steps), "fine-tune", "step", progress)
    for step in bar:
        x = _windows(train, starts[step], recipe.seq_len)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        curve.append(round(loss.item(), 5))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{curve[-1]:.3f}")
    train_s, train_cpu = time.perf_counter() - t_train, time.process_time() - cpu_train
    return curve, train_s, train_cpu


def finetune(base: Path, out: Path, recipe, train_works: dict[str, str], heldout_text: str,
             progress: bool = True, about: dict[str, Any] | None = None,
             heldout_own_text: str | None = None) -> dict[str, Any]:
    """Fine-tune ``base`` on ``train_works`` following ``recipe``; write a bf16 HF folder + recipe.json to ``out``.

    ``heldout_text`` is read the same way by base and fine-tune (no added tokens in it), so the two held-out
    losses compare; ``heldout_own_text``, when the training text has a format of its own (added tokens), is the
    held-out works in that format, scored on the fine-tune only.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start, cpu_start = time.perf_counter(), time.process_time()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        torch.manual_seed(recipe.seed)
        tok = AutoTokenizer.from_pretrained(str(base))
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        if recipe.added_tokens:
            tok.add_special_tokens({"additional_special_tokens": list(recipe.added_tokens)})
        train = _token_stream(tok, train_works)
        held = _token_stream(tok, {"heldout": heldout_text})
        base_loss = heldout_loss(model, held, recipe.eval_windows, recipe.eval_seq_len, recipe.batch, progress,
                                 "held-out loss (base)")

        model, trainable = _prepare(model, tok, recipe)
        curve, train_s, train_cpu = _train(model, trainable, train, recipe, progress)

        if recipe.lora_rank:
            model = model.merge_and_unload()   # W + (alpha/r) B A, back to plain nn.Linear
        _round_to_bf16_(model)
        ft_loss = heldout_loss(model, held, recipe.eval_windows, recipe.eval_seq_len, recipe.batch, progress,
                               "held-out loss (fine-tune)")
        own = {}
        if heldout_own_text is not None:
            own_stream = _token_stream(tok, {"heldout": heldout_own_text})
            own["heldout_loss_finetuned_own_format"] = round(heldout_loss(
                model, own_stream, recipe.eval_windows, recipe.eval_seq_len, recipe.batch, progress,
                "held-out loss (fine-tune, own format)"), 5)
        model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
        if recipe.added_tokens:
            tok.save_pretrained(str(out))
        else:
            for f in Path(base).iterdir():
                if f.is_file() and not _OWN_FILES.match(f.name):
                    shutil.copy2(f, out / f.name)

        import transformers
        info = {**(about or {}), "recipe": asdict(recipe), "base": Path(base).name,
                "train_works": list(train_works), "train_tokens": len(train), "heldout_tokens": len(held),
                "trainable_params": sum(p.numel() for p in trainable),
                "train_loss": curve, "heldout_loss_base": round(base_loss, 5),
                "heldout_loss_finetuned": round(ft_loss, 5), **own,
                "heldout_eval_tokens": recipe.eval_windows * recipe.eval_seq_len,
                "seconds_per_step": round(train_s / recipe.steps, 2),
                # CPU seconds (all threads): unlike wall time, barely moved by other load on the machine
                "cpu_seconds_per_step": round(train_cpu / recipe.steps, 2),
                "build_seconds": round(time.perf_counter() - t_start, 1),
                "build_cpu_seconds": round(time.process_time() - cpu_start, 1),
                "torch": torch.__version__, "transformers": transformers.__version__}
        (out / "recipe.json").write_text(json.dumps(info, indent=1))
        return info
    finally:
        torch.set_num_threads(threads)
