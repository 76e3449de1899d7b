"""Which tensor gets which codec and settings.

A method spec is ``NAME[:key=value[:key=value...]]`` (``,`` also separates settings). A value may itself
contain ``:`` — ``svd-mixed:groups=8:2+3:32+2:rest`` — a piece without ``=`` continues the previous value.
A rule is ``REGEX=SPEC``: the first rule whose regex matches a tensor name (``re.search``) decides it. User
rules come first, then the defaults below; a 2-D tensor no rule matches gets the main method, a 1-D one
is stored raw. An unchanged tensor (delta exactly zero) costs nothing unless a user rule names it.

``ratio=R`` asks for 1/R of the fine-tune's bytes on the compressed tensors: each compressed tensor gets
a budget of ``numel * itemsize / R`` bytes and its codec picks settings to fit (real sizes, never estimates).

``method="auto"`` spreads one budget (``ratio`` or ``bits`` per parameter) over the tensors the main method
would get: auto.py chooses a codec and settings per tensor and hands them to the plan (``choices``).
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

from .codecs import CodecName, get_codec
from .codecs.base import normalize
from .errors import SettingsError

# The method when none is given (CLI, API, demo).
DEFAULT_METHOD = CodecName.SVD_MIXED.value
# The pseudo-method that chooses a codec per tensor under one budget (auto.py).
AUTO = "auto"
# The codecs auto weighs without calibration data (unless --method auto:codecs= names others): with no data
# its distortion is the weight error. Across codec families (signs, sparse ternary codes, low rank) that
# ranks one tensor's candidates no better than chance against the measured KL (docs/auto.md), so without
# data auto weighs the two low-rank codecs only: both store a truncated SVD of the delta (svd-mixed in
# mixed-precision codes, lowrank in float16 factors), so their errors are alike in kind and the weight
# error picks between them as KL does (lowrank where the delta has a low rank, as a merged LoRA's).
DATA_FREE_AUTO_CODECS = (CodecName.SVD_MIXED.value, CodecName.LOWRANK.value)
# The codec of tensors only the fine-tune has (stored whole, in their own dtype: ``codec.whole(tensor)``).
WHOLE = CodecName.RAW.value

# Embeddings, output heads, norms and biases stay exact by default (BitDelta's choice: they are small,
# or in the case of embeddings, sensitive); the attention and MLP projections are compressed.
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(embed_tokens|embed_positions|embed_in|tok_embeddings|wte|wpe|word_embeddings|lm_head|embed_out)"
     r"(\.|$)|^output\.weight$", "raw"),
    # a mixture of experts' router (one row per expert: small, and every token's choice of experts hangs on it)
    (r"(^|\.)(gate|router|shared_expert_gate)\.weight$", "raw"),
    (r"(norm|ln_\d|ln_f)(\.|$)", "raw"),
    (r"\.bias$", "raw"),
)


def parse_method(spec: str) -> tuple[str, dict[str, str]]:
    """``"ternary:density=0.05"`` -> ``("ternary", {"density": "0.05"})``; the codec must exist."""
    if not isinstance(spec, str) or not spec.strip():
        raise SettingsError(f"empty method spec {spec!r}; expected NAME[:key=value...]")
    head, *rest = re.split(r"[:,]", spec.strip())
    name = get_codec(head).name  # raises with the list of choices
    settings: dict[str, str] = {}
    last = None
    for piece in rest:
        if "=" in piece:
            key, value = piece.split("=", 1)
            key = key.strip().replace("-", "_")
            if not key:
                raise SettingsError(f"method spec {spec!r}: empty setting name before '='")
            if key in settings:
                raise SettingsError(f"method spec {spec!r}: setting {key} given twice")
            settings[key] = value.strip()
            last = key
        elif last is not None:
            settings[last] += ":" + piece.strip()
        else:
            raise SettingsError(f"method spec {spec!r}: {piece!r} is not key=value")
    get_codec(name).resolve_settings(settings)  # validate early, with the codec's own messages
    return name, settings


def parse_auto(spec: str) -> dict[str, str]:
    """``"auto"`` -> {}; ``"auto:codecs=svd-mixed+lowrank"`` -> {"codecs": "svd-mixed+lowrank"}: the codecs
    auto may choose from, by name (each must exist and offer candidates at a budget)."""
    _, *rest = re.split(r"[:,]", spec.strip())
    settings: dict[str, str] = {}
    for piece in rest:
        key, eq, value = piece.partition("=")
        if not eq or key.strip().replace("-", "_") != "codecs":
            raise SettingsError(f"method spec {spec!r}: auto takes one setting, codecs=NAME[+NAME...], "
                                f"got {piece!r}")
        names = [get_codec(v).name for v in value.split("+") if v.strip()]  # raises with the choices
        if not names:
            raise SettingsError(f"method spec {spec!r}: codecs= names no codec")
        settings["codecs"] = "+".join(dict.fromkeys(names))
    return settings


@dataclass(frozen=True)
class Rule:
    pattern: str
    method: str
    settings: dict[str, str] = field(default_factory=dict)
    user: bool = True

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def parse_rule(text: str) -> Rule:
    """``'mlp\\.=ternary:density=0.1'`` -> Rule. The regex may not contain '='."""
    if not isinstance(text, str) or "=" not in text:
        raise SettingsError(f"rule {text!r}: expected REGEX=METHOD[:key=value...]")
    pattern, spec = text.split("=", 1)
    try:
        re.compile(pattern)
    except re.error as exc:
        raise SettingsError(f"rule {text!r}: bad regex {pattern!r} ({exc})") from None
    method, settings = parse_method(spec)
    return Rule(pattern, method, settings)


def _number(value: Any, what: str) -> Any:
    """A budget given as a number (an int or float, not a bool or a string), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingsError(f"{what} must be a number, got {value!r}")
    return value


@dataclass
class Assignment:
    codec: str
    settings: dict[str, Any]
    rule: str  # which rule decided (for inspect/debugging)
    given: dict[str, str] = field(default_factory=dict)  # the settings the user wrote (before defaults)


class Plan:
    def __init__(self, method: str = "bitdelta", rules: list[str | Rule] | tuple = (), ratio: float | None = None,
                 bits: float | None = None):
        self.auto = isinstance(method, str) and normalize(re.split(r"[:,]", method.strip())[0]) == AUTO
        self.method, self.method_settings = (AUTO, parse_auto(method)) if self.auto else parse_method(method)
        # --method auto:codecs=A+B: the codecs whose candidates auto weighs (None: every registered one with
        # calibration data, DATA_FREE_AUTO_CODECS without; ``codecs_for_auto``)
        self.auto_codecs = tuple(self.method_settings["codecs"].split("+")) if "codecs" in self.method_settings else None
        ratio, bits = _number(ratio, "--ratio"), _number(bits, "--bits")
        if ratio is not None and not (ratio > 1 and math.isfinite(ratio)):
            raise SettingsError(f"--ratio must be > 1 and finite (a compression factor), got {ratio}")
        if bits is not None and not self.auto:
            raise SettingsError("--bits is a budget for --method auto; other methods take --ratio or their own "
                                "settings (e.g. svd-mixed:bits=2)")
        if bits is not None and ratio is not None:
            raise SettingsError("give either --ratio or --bits for --method auto, not both")
        if bits is not None and not 0 < bits <= 32:
            raise SettingsError(f"--bits must be in (0, 32] bits per parameter, got {bits}")
        if self.auto and bits is None and ratio is None:
            raise SettingsError("--method auto needs a budget: --ratio R or --bits B")
        self.ratio, self.bits = ratio, bits
        self.choices: dict[str, Assignment] = {}  # --method auto: the allocation, set before assign()
        self.auto_report: dict[str, Any] = {}
        if isinstance(rules, str):
            raise SettingsError(f"rules must be a list of REGEX=METHOD strings, got the string {rules!r}")
        self.rules = [r if isinstance(r, Rule) else parse_rule(r) for r in rules]
        self.defaults = [Rule(p, *parse_method(m), user=False) for p, m in DEFAULT_RULES]

    def describe(self) -> dict[str, Any]:
        auto = {"bits": self.bits, "auto": self.auto_report} if self.auto else {}
        return {"method": self.method, "settings": self.method_settings, "ratio": self.ratio, **auto,
                "rules": [f"{r.pattern}={r.method}" + "".join(f":{k}={v}" for k, v in r.settings.items())
                          for r in self.rules]}

    def codecs_for_auto(self, data_free: bool) -> tuple[str, ...] | None:
        """The codecs auto weighs: those of ``auto:codecs=``, else DATA_FREE_AUTO_CODECS without calibration
        data, else None (every registered codec)."""
        if self.auto_codecs is not None:
            return self.auto_codecs
        return DATA_FREE_AUTO_CODECS if data_free else None

    def budget_hint(self, shape: tuple[int, ...], itemsize: int) -> float:
        """This tensor's even share of the --method auto budget, in bytes (fractional: summed first)."""
        numel = math.prod(shape)
        return numel * self.bits / 8 if self.bits is not None else numel * itemsize / self.ratio

    def auto_target(self, name: str, shape: tuple[int, ...], is_zero: bool) -> bool:
        """True when --method auto decides this tensor: a changed 2-D tensor no rule matches."""
        if not self.auto or is_zero or len(shape) != 2 or any(r.matches(name) for r in self.rules):
            return False
        return not any(r.matches(name) for r in self.defaults)

    def assign(self, name: str, shape: tuple[int, ...], itemsize: int, is_zero: bool) -> Assignment:
        rule = next((r for r in self.rules if r.matches(name)), None)
        if rule is None and is_zero:
            return Assignment(CodecName.ZERO.value, {}, "unchanged")
        if rule is None:
            rule = next((r for r in self.defaults if r.matches(name)), None)
        if rule is None and self.auto and len(shape) == 2:
            if name not in self.choices:
                raise SettingsError(f"{name}: --method auto made no choice for it (allocate before assigning)")
            return self.choices[name]
        if rule is None:
            if len(shape) == 2:
                rule = Rule("", self.method, self.method_settings, user=False)
            else:
                rule = Rule("", CodecName.RAW.value, {}, user=False)
        codec = get_codec(rule.method)
        if rule.method == CodecName.ZERO.value and not is_zero:
            raise SettingsError(f"rule {rule.pattern!r}=zero matches {name}, whose delta is not zero")
        if self.ratio is not None and codec.compresses:
            numel = 1
            for s in shape:
                numel *= s
            budget = int(numel * itemsize / self.ratio)
            if budget < 1 and numel:  # a ratio past the tensor's bytes: no codec stores anything in 0 bytes
                raise SettingsError(f"{name}: --ratio {self.ratio:g} leaves {budget} bytes for shape {tuple(shape)} "
                                    f"({numel * itemsize} bytes); use a lower --ratio or another method")
            try:
                settings = codec.settings_for_budget(tuple(shape), budget, dict(rule.settings))
            except SettingsError as exc:
                raise SettingsError(f"{name}: {exc}") from None
        else:
            settings = codec.resolve_settings(rule.settings)
        return Assignment(codec.name, settings, rule.pattern or "default", dict(rule.settings))
