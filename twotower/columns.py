"""Columnar encodings for files read with ``torch.load(weights_only=True)``.

``weights_only`` unpickling runs in Python, one step per pickled object, and ``torch.save``
calls a Python hook per object too: a list of a million strings or a dict of a million small
tensors costs seconds both ways, while a tensor of any size is one record written and read at
memory speed. So bulky collections travel as a few tensors:

* a list of strings → its UTF-8 bytes, NUL-separated, in one ``uint8`` tensor
  (:func:`pack_strings`);
* many short lists of strings (requests' items; histories up to format 2) → a :class:`Ragged`:
  the keys, an offsets tensor and every value in one packed string list, decoded only when
  asked for. Format-3 histories code their item ids against a vocabulary instead
  (:class:`twotower.checkpoint.Histories`): 20M short strings cost seconds to join and split.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import Any

import numpy as np
import torch

SEPARATOR = "\0"


@dataclass(eq=False)
class PackedStrings:
    """A list of strings as UTF-8 bytes in one ``uint8`` tensor, decoded on demand.

    Usually the strings joined by NUL (read back with one split); if a string contains NUL
    itself, the strings joined without separator plus ``ends``, the end of each string in
    characters.
    """

    utf8: torch.Tensor
    count: int
    ends: torch.Tensor | None = None

    @classmethod
    def pack(cls, strings: Sequence[str]) -> PackedStrings:
        text = SEPARATOR.join(strings)
        if text.count(SEPARATOR) == max(len(strings) - 1, 0):
            return cls(_bytes_tensor(text), len(strings))
        ends = np.fromiter(accumulate(map(len, strings)), dtype=np.int64, count=len(strings))
        return cls(_bytes_tensor("".join(strings)), len(strings), torch.from_numpy(ends))

    def __len__(self) -> int:
        return self.count

    def unpack(self, what: str = "strings") -> list[str]:
        """The strings.

        Raises:
            ValueError: the count or the offsets do not fit the text.
        """
        text = self.utf8.numpy().tobytes().decode("utf-8", "surrogatepass")
        if self.ends is None:
            out = text.split(SEPARATOR) if self.count else []
            if len(out) != self.count or (not self.count and text):
                raise ValueError(f"{what}: {self.count} strings announced, {len(out)} found")
            return out
        bounds = [0, *self.ends.tolist()]
        if len(bounds) != self.count + 1 or bounds[-1] != len(text) or any(b < a for a, b in pairwise(bounds)):
            raise ValueError(f"{what}: offsets do not fit the text")
        return [text[a:b] for a, b in pairwise(bounds)]

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"utf8": self.utf8, "count": self.count}
        if self.ends is not None:
            out["ends"] = self.ends
        return out

    @classmethod
    def decode(cls, data: Any, what: str) -> PackedStrings:
        """Checked as far as it can be without decoding the text (the rest: :meth:`unpack`).

        Raises:
            ValueError: not a packed string list, or its count does not fit.
        """
        if not isinstance(data, dict) or set(data) not in ({"utf8", "count"}, {"utf8", "count", "ends"}):
            raise ValueError(f"{what}: not a packed string list")
        utf8, count, ends = data["utf8"], data["count"], data.get("ends")
        if not (isinstance(utf8, torch.Tensor) and utf8.dtype == torch.uint8 and utf8.ndim == 1):
            raise ValueError(f"{what}: text is not a uint8 vector")
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"{what}: bad count {count!r}")
        if ends is None:
            if utf8.numpy().tobytes().count(b"\0") != max(count - 1, 0) or (count == 0 and utf8.numel()):
                raise ValueError(f"{what}: {count} strings announced, the text holds another number")
        elif not (isinstance(ends, torch.Tensor) and ends.dtype == torch.int64 and ends.shape == (count,)):
            raise ValueError(f"{what}: ends are not {count} int64 offsets")
        return cls(utf8, count, ends)


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8).copy())


def pack_strings(strings: Sequence[str]) -> dict[str, Any]:
    """``strings`` as a dict of a ``uint8`` tensor and a count (see :class:`PackedStrings`)."""
    return PackedStrings.pack(strings).encode()


def unpack_strings(data: Any, what: str = "strings") -> list[str]:
    """The list :func:`pack_strings` packed.

    Raises:
        ValueError: ``data`` is not such a list or does not fit its count.
    """
    return PackedStrings.decode(data, what).unpack(what)


@dataclass(eq=False)
class Ragged:
    """``keys[k]`` → ``values[offsets[k]:offsets[k + 1]]``: many short string lists as one packed
    string list. ``offsets`` is ``[len(keys) + 1]`` int64 from 0 to ``len(values)``."""

    keys: list[str]
    offsets: torch.Tensor
    values: PackedStrings

    @classmethod
    def empty(cls) -> Ragged:
        return cls([], torch.zeros(1, dtype=torch.int64), PackedStrings.pack([]))

    @classmethod
    def from_flat(cls, keys: list[str], lengths: Iterable[int], flat: Sequence[str]) -> Ragged:
        """``keys[k]`` owns the next ``lengths[k]`` strings of ``flat``."""
        offsets = np.zeros(len(keys) + 1, dtype=np.int64)
        offsets[1:] = np.fromiter(lengths, dtype=np.int64, count=len(keys))
        np.cumsum(offsets, out=offsets)
        if int(offsets[-1]) != len(flat):
            raise ValueError(f"lengths sum to {int(offsets[-1])} but there are {len(flat)} values")
        return cls(keys, torch.from_numpy(offsets), PackedStrings.pack(flat))

    @classmethod
    def from_lists(cls, keys: list[str], lists: Sequence[Sequence[str]]) -> Ragged:
        return cls.from_flat(keys, map(len, lists), [v for values in lists for v in values])

    def __len__(self) -> int:
        return len(self.keys)

    def flat(self) -> list[str]:
        """Every value, in order."""
        return self.values.unpack()

    def bounds(self) -> list[int]:
        return self.offsets.tolist()

    def lists(self) -> list[list[str]]:
        """The lists, in key order."""
        flat = self.flat()
        return [flat[a:b] for a, b in pairwise(self.bounds())]

    def check(self, what: str) -> None:
        """Raises ValueError unless the offsets fit the keys and the values."""
        off = self.offsets
        if not isinstance(off, torch.Tensor) or off.dtype != torch.int64 or off.shape != (len(self.keys) + 1,):
            raise ValueError(f"{what}: offsets do not fit {len(self.keys)} keys")
        if int(off[0]) != 0 or int(off[-1]) != len(self.values) or bool((off[1:] < off[:-1]).any()):
            raise ValueError(f"{what}: offsets are not 0 … {len(self.values)} ascending")

    def encode(self) -> dict[str, Any]:
        return {"keys": pack_strings(self.keys), "offsets": self.offsets, "values": self.values.encode()}

    @classmethod
    def decode(cls, data: Any, what: str) -> Ragged:
        if not isinstance(data, dict):
            raise ValueError(f"{what}: not a ragged column")
        out = cls(
            unpack_strings(data.get("keys"), f"{what}.keys"),
            data.get("offsets"),
            PackedStrings.decode(data.get("values"), f"{what}.values"),
        )
        out.check(what)
        return out
