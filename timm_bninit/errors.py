"""The project's error base, its one "did you mean" helper, and the messages more than one module raises or warns.

Every timm-bninit error subclasses :class:`BNInitError` *and* the builtin it has always been (``ValueError``,
``KeyError``, ``RuntimeError``), so ``except ValueError`` keeps working while a command line catches every project
error in one place and prints it as one line.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

__all__ = ["BNInitError", "BNInitValueError", "BNInitTypeError", "RecipeError", "did_you_mean", "STALE_STATISTICS"]


class BNInitError(Exception):
    """Base of every error timm-bninit raises on purpose; the message says what was wrong and what to do."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument (quotes and escaped newlines): show the message itself
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class BNInitValueError(BNInitError, ValueError):
    """A plugin function or layer given a value it cannot use (a bad argument, an input of the wrong shape)."""


class BNInitTypeError(BNInitError, TypeError):
    """A plugin function given an object of a type it cannot use."""


class RecipeError(BNInitError, ValueError):
    """A recipe or override that cannot be used; the message names the valid choices.

    Raised by the experiment engine's recipes and by what a recipe asks of a model (a CIFAR stem, a trainable
    classifier); it lives here so that code below the recipe module raises it without importing the recipe module.
    """


def did_you_mean(name: str, choices: Iterable[str], *, key: Callable[[str], str] | None = None, n: int = 3,
                 cutoff: float = 0.6) -> str:
    """``"Did you mean 'a', 'b'?"`` for the choices closest to ``name``, or ``""`` when none is close.

    Args:
        name: What was asked for.
        choices: The valid names.
        key: Normalises both sides before comparing (timm compares norm names without '_' and lower-cased).
        n: At most this many suggestions.
        cutoff: difflib's similarity cut-off.
    """
    key = key or (lambda text: text)
    by_key = {key(choice): choice for choice in choices}
    close = difflib.get_close_matches(key(name), list(by_key), n=n, cutoff=cutoff)
    return f"Did you mean {', '.join(repr(by_key[k]) for k in close)}?" if close else ""


# A bn_transfer policy that changed pretrained γ (convert_norm, load_pretrained): docs/methods.md §9
STALE_STATISTICS = ("bn_transfer={policy!r} changed γ in {count} norm layers, so the running statistics of later "
                    "layers no longer match their inputs; recalibrate them with "
                    "timm_bninit.recalibrate_bn_stats(model, train_batches){extra} before evaluating")
