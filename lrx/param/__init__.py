"""lrx.param: weight parameterizations. ``dot(x, w)`` is the one function lrx models use for
``x @ W``; it accepts dense arrays and (once defined) factored weight nodes."""

from lrx.param.core import dot

__all__ = ["dot"]
