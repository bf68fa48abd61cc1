"""One place that says which layer types have a per-example rule: each rule module registers
its types with :func:`register`; :func:`kind` finds the rule for a module.

A rule is ``rule(module, uses, method) -> Tensor [B]``: the squared norm of each example's
gradient of the module's own trainable parameters, from its recorded calls (``uses``: input
args and output gradient of each call) and the forward/Gram choice ``method``. Adding a layer
type is one module with one registered function, imported in ``__init__``. A rule that needs
more of the forward than the inputs (the statistics a norm layer computed) registers
``keep(module, output)``: what it returns is recorded with the call, as ``use.kept``. It runs in
the forward, must not raise, and returns None when it cannot tell (the rule then does without).
"""

from __future__ import annotations

from torch import nn

RULES: dict[type, object] = {}  # layer base class -> rule, in registration order
KEEPS: dict[type, object] = {}  # layer base class -> keep(module, output), for rules that have one


def register(*types: type, keep=None):
    """Decorator: ``@register(nn.Linear)`` over a rule function."""
    def add(rule):
        for t in types:
            if t in RULES:
                raise ValueError(f"a per-example rule for {t.__name__} is already registered")
        for t in types:
            RULES[t] = rule
            if keep is not None:
                KEEPS[t] = keep
        return rule
    return add


def kind(module: nn.Module) -> type | None:
    """The registered base class whose math applies, or None. A subclass that overrides
    ``forward`` (a LoRA wrapper, a quantised linear) computes something else: unsupported."""
    for base in RULES:
        if isinstance(module, base):
            return base if type(module).forward is base.forward else None
    return None
